"""Pure run decisions: step counts, batch geometry across worker counts, resume compatibility."""

from __future__ import annotations

import pytest

from clusterft.errors import UserError
from clusterft.storage import BundleStore
from clusterft.train.launcher import locate, preflight, run_status
from clusterft.train.plan import check_resumable, plan_run
from tests.train.helpers import make_job


def spec(tmp_path, **overrides):
    return make_job(tmp_path / "model", tmp_path / "out", **overrides)


def test_max_steps_wins(tmp_path):
    plan = plan_run(spec(tmp_path), world_size=2, num_train_examples=64)
    assert (plan.micro_batch_size, plan.global_micro_batch, plan.micro_steps_per_epoch) == (2, 4, 16)
    assert plan.total_steps == 8
    assert plan.position(7, 1) == (0, 15)
    assert plan.position(8) == (1, 0)  # the data order wraps into epoch 1


def test_epochs_give_the_step_count(tmp_path):
    plan = plan_run(spec(tmp_path, max_steps=-1, num_train_epochs=2.0), world_size=2, num_train_examples=64)
    assert plan.total_steps == 2 * 16 // 2


def test_resume_on_fewer_workers_keeps_the_global_batch(tmp_path):
    plan = plan_run(spec(tmp_path, cluster={"num_workers": 1}), 1, 64, global_micro_batch=4)
    assert (plan.micro_batch_size, plan.global_micro_batch) == (4, 4)
    with pytest.raises(UserError, match="cannot be split evenly over 3"):
        plan_run(spec(tmp_path, cluster={"num_workers": 3}), 3, 64, global_micro_batch=4)


def test_elastic_run_keeps_its_full_size_global_batch(tmp_path):
    """An elastic [1, 2] job that starts (or goes on) on 1 worker takes the 2-worker global batch:
    the micro-batch per worker doubles, gradient accumulation stays."""
    elastic = spec(tmp_path, cluster={"num_workers": [1, 2]})
    one, two = plan_run(elastic, 1, 64), plan_run(elastic, 2, 64)
    assert (one.micro_batch_size, one.global_micro_batch, one.gradient_accumulation_steps) == (4, 4, 2)
    assert (two.micro_batch_size, two.global_micro_batch, two.total_steps) == (2, 4, one.total_steps)


def test_pipeline_data_parallel_size(tmp_path):
    pipe = spec(
        tmp_path, finetuning_type="full", cluster={"num_workers": 4}, parallel={"strategy": "pipeline"}
    )
    plan = plan_run(pipe, 4, 64)
    assert (plan.data_parallel_size, plan.global_micro_batch) == (2, 4)


def test_too_little_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot fill one micro-step"):
        plan_run(spec(tmp_path), 2, 3)


SAVED = {"model": "m1", "finetuning_type": "lora", "data": "d1", "lora_rank": 4, "lora_target": ["q_proj"]}


@pytest.mark.parametrize(
    "change, key",
    [({"model": "m2"}, "model"), ({"lora_rank": 8}, "lora_rank"), ({"data": "d2"}, "data")],
)
def test_incompatible_checkpoint_refused(change, key):
    with pytest.raises(UserError, match=rf"(?s){key}: checkpoint has .*weights_only: true"):
        check_resumable(SAVED, {**SAVED, **change}, weights_only=False, bundle="step_000000004")


def test_weights_only_allows_new_data_and_model_but_not_new_shapes():
    check_resumable(SAVED, {**SAVED, "data": "d2", "model": "m2"}, weights_only=True, bundle="b")
    with pytest.raises(UserError, match="lora_rank"):
        check_resumable(SAVED, {**SAVED, "lora_rank": 8}, weights_only=True, bundle="b")


def test_resuming_refuses_edited_optimisation_settings_but_weights_only_applies_them(tmp_path):
    from clusterft.train.plan import resumed_settings

    old = spec(tmp_path)
    new = spec(tmp_path, learning_rate=old.train.learning_rate * 2, gradient_accumulation_steps=3)
    saved = {**SAVED, "train": resumed_settings(old)}
    current = {**SAVED, "train": resumed_settings(new)}
    with pytest.raises(UserError) as refused:
        check_resumable(saved, current, weights_only=False, bundle="step_000000004")
    message = str(refused.value)
    assert "learning_rate: checkpoint has" in message and "gradient_accumulation_steps" in message
    assert "weight_decay" not in message and "weights_only: true" in message
    check_resumable(saved, current, weights_only=True, bundle="b")  # a new schedule from the weights
    check_resumable(saved, saved, weights_only=False, bundle="b")
    check_resumable(SAVED, current, weights_only=False, bundle="b")  # an older checkpoint: no record


def test_fewer_steps_than_planned_is_a_failure():
    assert run_status(None, planned=8, completed=8) == ("succeeded", None)
    assert run_status(None, planned=8, completed=6) == ("failed", "completed 6 of 8 planned steps")
    assert run_status(RuntimeError("worker died"), 8, 8) == ("failed", "RuntimeError: worker died")


def test_preflight_refuses_stale_checkpoints_when_resume_is_off(tiny_llama, tmp_path):
    job = make_job(tiny_llama, tmp_path / "out", resume={"enabled": False})
    store = BundleStore(locate(job).bundle_root)
    store.publish(store.begin(2), 2, {})
    with pytest.raises(UserError, match="overwrite_output_dir: true"):
        preflight(job, locate(job))
    overwrite = make_job(tiny_llama, tmp_path / "out", resume={"enabled": False}, overwrite_output_dir=True)
    preflight(overwrite, locate(overwrite))
    assert store.find_latest_valid() is None


def test_preflight_refuses_a_from_checkpoint_that_is_missing_or_invalid(tiny_llama, tmp_path):
    missing = tmp_path / "other" / "bundles" / "step_000000004"
    job = make_job(tiny_llama, tmp_path / "out", resume={"from_checkpoint": str(missing)})
    with pytest.raises(UserError, match=rf"resume.from_checkpoint: {missing} does not exist"):
        preflight(job, locate(job))
    store = BundleStore(missing.parent)
    store.publish(store.begin(4), 4, {})
    (missing / "stray.pt").write_bytes(b"x")  # a file the manifest does not vouch for
    with pytest.raises(UserError, match=r"is not valid: stray\.pt: not in the manifest; give a complete"):
        preflight(job, locate(job))


def test_preflight_reads_from_checkpoint_only_without_a_bundle_of_its_own(tiny_llama, tmp_path):
    """The run's own newest bundle wins: after a restart the run continues from its own progress,
    and the bundle it started from is not looked at again."""
    job = make_job(
        tiny_llama, tmp_path / "out", resume={"from_checkpoint": str(tmp_path / "gone" / "step_000000004")}
    )
    own = BundleStore(locate(job).bundle_root)
    own.publish(own.begin(2), 2, {"spec_hash": job.spec_hash()})  # written by this very spec
    with pytest.raises(UserError, match="not a clusterft training checkpoint"):
        preflight(job, locate(job))  # it went on to load its own (empty) bundle, not the missing one


def test_a_run_from_scratch_never_writes_into_another_runs_output_dir(tiny_llama, tmp_path):
    """overwrite_output_dir: false guards the output_dir as LLaMA-Factory's does; the same job's
    earlier attempt (its spec hash in the run dir) and its own checkpoint folder do not count."""
    from clusterft.train.launcher import SPEC_MARKER

    job = make_job(tiny_llama, tmp_path / "out")
    where = locate(job)
    preflight(job, where)  # no output_dir yet: the run's own data cache is all it writes there
    (where.output_dir / "adapter_model.safetensors").write_bytes(b"someone else's export")
    with pytest.raises(UserError, match=r"already holds another run's files \(adapter_model\.safetensors\)"):
        preflight(job, where)
    foreign = make_job(tiny_llama, tmp_path / "foreign")
    locate(foreign).output_dir.mkdir(parents=True)
    (locate(foreign).output_dir / "model.safetensors").write_bytes(b"another run's export")
    with pytest.raises(UserError, match="another run's files"):
        preflight(foreign, locate(foreign))
    assert [p.name for p in locate(foreign).output_dir.iterdir()] == ["model.safetensors"]  # untouched
    overwrite = make_job(tiny_llama, tmp_path / "out", overwrite_output_dir=True)
    preflight(overwrite, locate(overwrite))
    (where.run_dir / SPEC_MARKER).write_text(job.spec_hash())  # this job ran here before
    preflight(job, where)
    other = make_job(tiny_llama, tmp_path / "out", learning_rate=0.5)
    with pytest.raises(UserError, match="overwrite_output_dir: true"):
        preflight(other, locate(other))
