"""The controller's reconcile pass and spec upgrade, without Ray: real store, real registry, real
serving records, and the real `clusterft registry promote|rollback` commands moving the aliases."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from clusterft.cli import main as cli
from clusterft.controller.controller import Controller
from clusterft.controller.state import Evaluating, Failed, JobState, Registered, Training
from clusterft.controller.stored_spec import SPEC_SCHEMA_VERSION, job_spec
from clusterft.registry.registry import Registry
from clusterft.registry.serving import ServingRecord, remove_record, write_record
from tests.controller.conftest import make_spec

S = JobState


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    made = Controller(tmp_path / "controller", tmp_path / "registry", env={})
    yield made
    made.store.close()


def registered_job(controller: Controller, tmp_path: Path, weights: str) -> tuple[str, str]:
    """A job that trained and registered a version of `demo` without promoting it: (job id, version)."""
    model = tmp_path / f"model-{weights}"
    model.mkdir()
    (model / "weights.bin").write_text(weights)
    store = controller.store
    job = store.submit(make_spec())
    version = controller.registry.register("demo", model, kind="full", job_id=job.id).version
    store.transition(job.id, S.SUBMITTED, Training())
    store.transition(job.id, S.TRAINING, Evaluating(completed_steps=10))
    store.transition(job.id, S.EVALUATING, Registered("demo", version))
    return job.id, version


def serve(
    controller: Controller, version: str, replica: str = "app#engine#r1", at: float | None = None
) -> None:
    """What a follower replica writes: it serves `version` now."""
    at = time.time() if at is None else at
    record = ServingRecord("demo", version, "production", "app", replica, "node-1", 1, at, at, 5.0)
    write_record(controller.registry.root, record)


def registry_cli(controller: Controller, *args: str) -> None:
    assert cli(["registry", "--registry", str(controller.registry.root), *args]) == 0


def status(controller: Controller, job_id: str) -> tuple[JobState, str | None]:
    job = controller.store.get(job_id)
    return job.status, job.reason


def test_jobs_follow_cli_promotions_rollbacks_and_serving_replicas(controller, tmp_path) -> None:
    first, v1 = registered_job(controller, tmp_path, "one")
    second, v2 = registered_job(controller, tmp_path, "two")
    controller.tick()
    assert status(controller, first) == status(controller, second) == (S.REGISTERED, None)

    registry_cli(controller, "promote", "demo", v1)
    controller.tick()
    assert controller.store.get(first).status is S.PROMOTED
    assert controller.store.get(first).reason.startswith(f"production promoted to {v1} (")
    serve(controller, v1)
    controller.tick()
    assert controller.store.get(first).status is S.SERVING

    registry_cli(controller, "promote", "demo", v2)
    controller.tick()  # the replica still serves v1: the second job waits in promoted
    job, why = status(controller, first)
    assert job is S.REGISTERED and why.startswith(f"production promoted to {v2} (")
    assert controller.store.get(second).status is S.PROMOTED
    serve(controller, v2)
    controller.tick()
    assert controller.store.get(second).status is S.SERVING

    registry_cli(controller, "rollback", "demo")
    serve(controller, v1)
    controller.tick()  # registered -> promoted -> serving in one pass
    job, why = status(controller, second)
    assert job is S.REGISTERED and why.startswith(f"production rolled back to {v1} (")
    assert controller.store.get(first).status is S.SERVING
    history = [e.to_state for e in controller.store.events(first)]
    assert history == [
        S.SUBMITTED,
        S.TRAINING,
        S.EVALUATING,
        S.REGISTERED,
        S.PROMOTED,
        S.SERVING,
        S.REGISTERED,
        S.PROMOTED,
        S.SERVING,
    ]


def test_a_dead_or_stopped_replica_sends_serving_back_to_promoted(controller, tmp_path) -> None:
    job_id, v1 = registered_job(controller, tmp_path, "one")
    registry_cli(controller, "promote", "demo", v1)
    serve(controller, v1, at=1000.0)
    controller.reconcile(now=1004.0)
    assert controller.store.get(job_id).status is S.SERVING
    controller.reconcile(now=1006.0)  # the heartbeat is 6 s old, the bound 5 s: not live
    assert status(controller, job_id) == (S.PROMOTED, f"no live replica serves {v1}")
    serve(controller, v1, at=1010.0)
    controller.reconcile(now=1010.0)
    assert controller.store.get(job_id).status is S.SERVING
    remove_record(controller.registry.root, "demo", "app#engine#r1")  # a clean shutdown
    controller.reconcile(now=1010.0)
    assert controller.store.get(job_id).status is S.PROMOTED


def test_a_gate_held_job_is_not_promoted_by_a_replica_that_happens_to_serve_it(controller, tmp_path) -> None:
    job_id, v1 = registered_job(controller, tmp_path, "one")
    serve(controller, v1)  # e.g. pinned by POST /v1/admin/reload, while no alias points at it
    controller.tick()
    assert controller.store.get(job_id).status is S.REGISTERED
    assert Registry(controller.registry.root).aliases("demo")["production"] is None


def test_an_old_spec_loses_removed_keys_once_with_a_warning_in_the_history(controller) -> None:
    job = controller.store.submit(make_spec(failure={"max_job_restarts": 2, "backoff_s": 60}))
    controller.store.transition(job.id, S.SUBMITTED, Training())
    controller.store.transition(job.id, S.TRAINING, Failed("RuntimeError: worker died"))
    raw = yaml.safe_load(job.spec_yaml)
    raw["train"]["logging_dir"] = "runs/"  # fields an older clusterft had
    raw["legacy"] = {"enabled": True}
    with sqlite3.connect(controller.store.path) as db:
        db.execute(
            "UPDATE jobs SET spec_yaml = ?, spec_schema = 0 WHERE id = ?", (yaml.safe_dump(raw), job.id)
        )

    controller.tick()  # upgrades the spec, then decides as usual
    job = controller.store.get(job.id)
    assert job.status is S.RESUMING and job.spec_schema == SPEC_SCHEMA_VERSION
    assert "logging_dir" not in job.spec_yaml and "legacy" not in job.spec_yaml
    assert job_spec(job).failure.backoff_s == 60
    warnings = [e for e in controller.store.events(job.id) if e.from_state == e.to_state]
    assert len(warnings) == 1
    assert warnings[0].to_state is S.FAILED
    assert warnings[0].reason == (
        "spec stored by an older clusterft (spec schema 0): dropped legacy, train.logging_dir, "
        "which this one no longer has"
    )
    assert warnings[0].data == {
        "warning": "spec_schema",
        "from_schema": 0,
        "dropped": {"train.logging_dir": "runs/", "legacy": {"enabled": True}},
    }
    controller.tick()
    assert len([e for e in controller.store.events(job.id) if e.from_state == e.to_state]) == 1


def test_a_spec_of_a_newer_clusterft_is_left_alone_and_said_once(controller, caplog) -> None:
    job = controller.store.submit(make_spec())
    with sqlite3.connect(controller.store.path) as db:
        db.execute("UPDATE jobs SET spec_schema = ? WHERE id = ?", (SPEC_SCHEMA_VERSION + 1, job.id))
    controller.tick()
    controller.tick()
    assert controller.store.get(job.id).status is S.SUBMITTED
    assert "upgrade clusterft" in controller.unreadable[job.id]
    assert len([r for r in caplog.records if "leaving job" in r.message]) == 1


def merge_job(controller: Controller, adapter: Path, base: Path) -> str:
    """A LoRA job with promote.merge whose training is done: the controller's next step is the eval
    driver (a real subprocess), which merges and checks; evaluation is off to keep it to the merge."""
    spec = make_spec(
        model_name_or_path=str(base),
        finetuning_type="lora",
        output_dir=str(adapter),
        eval={"enabled": False},
        promote={"merge": True},
    )
    job = controller.store.submit(spec)
    controller.store.transition(job.id, S.SUBMITTED, Training())
    controller.store.transition(job.id, S.TRAINING, Evaluating(completed_steps=10))
    return job.id


def tick_until_settled(controller: Controller, job_id: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while controller.store.get(job_id).status is S.EVALUATING:
        assert time.monotonic() < deadline, "the eval driver did not finish"
        controller.tick()
        time.sleep(0.2)


@pytest.fixture
def merging_controller(tmp_path: Path) -> Controller:
    import os

    made = Controller(tmp_path / "controller", tmp_path / "registry", env=dict(os.environ))
    yield made
    made.store.close()


def test_promote_merge_registers_the_checked_merged_model_and_a_broken_adapter_errors(
    merging_controller, tmp_path, tiny_llama
) -> None:
    from tests.hf.helpers import make_trained_adapter

    controller = merging_controller
    adapter = make_trained_adapter(Path(tiny_llama), tmp_path / "adapter")
    job_id = merge_job(controller, adapter, Path(tiny_llama))
    tick_until_settled(controller, job_id)

    job = controller.store.get(job_id)
    assert job.status in (S.PROMOTED, S.REGISTERED), job.reason
    version = controller.registry.show("adapter", job.result["version"])
    manifest = version.manifest
    assert manifest.kind == "merged" and manifest.job_id == job_id
    check = manifest.merge_check
    assert check["passed"] and check["rel_diff"] <= check["tolerance"] and check["dtype"] == "float32"
    assert check["adapter_effect"] > 0  # the adapter changed the logits: the check compared something
    assert (version.path / "model.safetensors").is_file()
    assert not (version.path / "adapter_config.json").exists()
    controller.registry.verify("adapter", version.version)  # every registered file matches its sha256

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in adapter.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    broken_id = merge_job(controller, broken, Path(tiny_llama))
    tick_until_settled(controller, broken_id)
    job, why = status(controller, broken_id)
    assert job is S.ERROR and why.startswith("evaluation or merge check failed: ")
    assert "broken" not in controller.registry.models()  # nothing registered from a failed merge
