"""The controller's reconcile pass and spec upgrade, without Ray: real store, real registry, real
serving records, and the real `clusterft registry promote|rollback` commands moving the aliases."""

from __future__ import annotations

import copy
import itertools
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml

from clusterft.cli import main as cli
from clusterft.config import JobSpec
from clusterft.controller.controller import Controller
from clusterft.controller.state import Cancelled, Evaluating, Failed, JobState, Registered, Resuming, Training
from clusterft.controller.store import JobStore
from clusterft.controller.stored_spec import SPEC_SCHEMA_VERSION, job_spec
from clusterft.registry.registry import Registry
from clusterft.registry.serving import ServingRecord, remove_record, write_record
from clusterft.storage import BundleStore
from clusterft.train.launcher import locate
from tests.controller.conftest import make_spec

S = JobState


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    made = Controller(tmp_path / "controller", tmp_path / "registry", env={})
    yield made
    made.close()


def as_user(controller: Controller) -> JobStore:
    """The controller's job store as `clusterft jobs` commands write it: not fenced by the
    controller's leases (its own writes need its lease on the job). The same connection, so the
    same journal mode and locks as the controller's."""
    user = copy.copy(controller.store)
    user.fence = None
    return user


def registered_job(controller: Controller, tmp_path: Path, weights: str) -> tuple[str, str]:
    """A job that trained and registered a version of `demo` without promoting it: (job id, version)."""
    model = tmp_path / f"model-{weights}"
    model.mkdir()
    (model / "weights.bin").write_text(weights)
    store = as_user(controller)
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
    as_user(controller).transition(job.id, S.SUBMITTED, Training())
    as_user(controller).transition(job.id, S.TRAINING, Failed("RuntimeError: worker died"))
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
        "kept_meaning": {},
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
    as_user(controller).transition(job.id, S.SUBMITTED, Training())
    as_user(controller).transition(job.id, S.TRAINING, Evaluating(completed_steps=10))
    return job.id


def tick_until_settled(controller: Controller, job_id: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while controller.store.get(job_id).status is S.EVALUATING:
        assert time.monotonic() < deadline, "the eval driver did not finish"
        controller.tick()
        time.sleep(0.2)


@pytest.fixture
def merging_controller(tmp_path: Path) -> Controller:
    made = Controller(tmp_path / "controller", tmp_path / "registry", env=dict(os.environ))
    yield made
    made.close()


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


# ---------------------------------------------------------------- hardening: no job is ever lost


def failed_job(controller: Controller) -> str:
    """A job whose training failed: the next tick decides to resume it after a minute (nothing runs)."""
    store = as_user(controller)
    job = store.submit(make_spec(failure={"max_job_restarts": 2, "backoff_s": 60}))
    store.transition(job.id, S.SUBMITTED, Training())
    store.transition(job.id, S.TRAINING, Failed("RuntimeError: worker died"))
    return job.id


def test_a_corrupt_row_is_set_aside_and_every_other_job_still_moves(controller, caplog) -> None:
    first, corrupt, bad_spec, newer, last = (failed_job(controller) for _ in range(5))
    with sqlite3.connect(controller.store.path) as db:
        db.execute("UPDATE jobs SET state_data = '{\"why\": ' WHERE id = ?", (corrupt,))
        db.execute("UPDATE jobs SET spec_yaml = 'model: [unclosed' WHERE id = ?", (bad_spec,))
        db.execute("UPDATE jobs SET state = 'paused' WHERE id = ?", (newer,))  # a newer clusterft's state
    controller.tick()
    controller.tick()
    assert controller.store.get(first).status is controller.store.get(last).status is S.RESUMING

    job, why = status(controller, corrupt)  # readable again, and resumable from its checkpoint
    assert job is S.ERROR and why.startswith("the job store's record of this job could not be read")
    assert f"clusterft jobs resume {corrupt}" in why
    [event] = [e for e in controller.store.events(corrupt) if e.to_state is S.ERROR]
    assert event.from_state is S.FAILED and event.data["unreadable"] == {"state_data": '{"why": '}

    job, why = status(controller, bad_spec)
    assert job is S.ERROR and why.startswith("its stored spec cannot be read: ")

    with sqlite3.connect(controller.store.path) as db:  # left as the newer clusterft wrote it
        assert db.execute("SELECT state FROM jobs WHERE id = ?", (newer,)).fetchone() == ("paused",)
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len([m for m in said if corrupt in m]) == 1 and len([m for m in said if newer in m]) == 1


def locked_controller(tmp_path: Path) -> Controller:
    """A controller on a rollback-journal store that gives up on a lock after 50 ms."""
    return Controller(
        tmp_path / "controller", tmp_path / "registry", env={}, journal_mode="delete", busy_timeout_s=0.05
    )


def test_a_locked_store_fails_ticks_the_loop_backs_off_and_recovers(tmp_path, caplog) -> None:
    from clusterft.controller.actor import supervise
    from clusterft.controller.policy import TickFailurePolicy

    controller = locked_controller(tmp_path)
    job_id = failed_job(controller)
    locker = sqlite3.connect(controller.store.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # nobody reads or writes the store until it ends
    stop, wake, outcome = threading.Event(), threading.Event(), []
    policy = TickFailurePolicy(max_consecutive=1000, first_backoff_s=0.05, max_backoff_s=0.4)
    loop = threading.Thread(
        target=lambda: outcome.append(supervise(controller, wake, 0.02, policy, stop=stop))
    )
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while len(failures := [r for r in caplog.records if "tick failed" in r.getMessage()]) < 5:
            assert loop.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        assert all("database is locked" in r.getMessage() for r in failures)
        waits = [r.args[-1] for r in failures[:5]]
        assert waits == [0.05, 0.1, 0.2, 0.4, 0.4]
        gaps = [b.created - a.created for a, b in itertools.pairwise(failures[:5])]
        assert all(gap >= wait for gap, wait in zip(gaps, waits[:4], strict=True)), gaps
        locker.execute("ROLLBACK")
        while controller.store.get(job_id).status is not S.RESUMING:
            assert loop.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        locker.close()
        stop.set()
        wake.set()
        loop.join(10)
        controller.close()
    assert outcome == [None]


def test_a_store_that_stays_locked_ends_the_loop_so_ray_restarts_the_actor(tmp_path) -> None:
    from clusterft.controller.actor import supervise
    from clusterft.controller.policy import RestartController, TickFailurePolicy

    controller = locked_controller(tmp_path)
    locker = sqlite3.connect(controller.store.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        policy = TickFailurePolicy(max_consecutive=3, first_backoff_s=0.01, max_backoff_s=0.01)
        decision = supervise(controller, threading.Event(), 0.01, policy)
    finally:
        locker.close()
        controller.close()
    assert isinstance(decision, RestartController)
    assert decision.reason.startswith("3 ticks in a row failed, the last with OperationalError: database is")


def evaluated_job(
    controller: Controller, tmp_path: Path, name: str = "demo", size_mb: int = 1, **sections: dict
) -> str:
    """A full fine-tune whose training is done and which has no eval driver to run (eval off): its
    next tick registers `output_dir` (a weights file of `size_mb`, sparse) as a version of `name`."""
    output = tmp_path / name
    output.mkdir()
    (output / "config.json").write_text("{}")
    with open(output / "model.safetensors", "wb") as weights:
        weights.truncate(size_mb << 20)
    (output / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    spec = make_spec(output_dir=str(output), finetuning_type="full", eval={"enabled": False}, **sections)
    job = controller.store.submit(spec)
    as_user(controller).transition(job.id, S.SUBMITTED, Training())
    as_user(controller).transition(job.id, S.TRAINING, Evaluating(completed_steps=10))
    return job.id


def tick_while_evaluating(controller: Controller, job_id: str, timeout_s: float = 60.0) -> list[float]:
    """Tick until the job leaves `evaluating`; each tick's duration in seconds."""
    durations, deadline = [], time.monotonic() + timeout_s
    while controller.store.get(job_id).status is S.EVALUATING:
        assert time.monotonic() < deadline, f"{job_id} still evaluating after {timeout_s}s"
        started = time.perf_counter()
        controller.tick()
        durations.append(time.perf_counter() - started)
        time.sleep(0.01)
    return durations


def test_a_job_without_gates_registers_and_promotes_only_with_promote_auto(controller, tmp_path) -> None:
    held = evaluated_job(controller, tmp_path, "held")
    auto = evaluated_job(controller, tmp_path, "auto", promote={"auto": True})
    tick_while_evaluating(controller, held)
    tick_while_evaluating(controller, auto)
    controller.tick()
    job, why = status(controller, held)
    assert job is S.REGISTERED and why.startswith("not promoted: no promote.gates, and promote.auto is false")
    assert "clusterft registry promote held v0001" in why
    assert controller.registry.aliases("held")["production"] is None
    assert controller.store.get(auto).status is S.PROMOTED
    assert controller.registry.aliases("auto")["production"] == "v0001"


def test_tick_stays_responsive_while_a_large_model_registers(controller, tmp_path) -> None:
    job_id = evaluated_job(controller, tmp_path, size_mb=256, promote={"auto": True})
    started = time.perf_counter()
    durations = tick_while_evaluating(controller, job_id)
    registered_s = time.perf_counter() - started
    controller.tick()
    assert controller.store.get(job_id).status is S.PROMOTED
    print(
        f"\nregistering 256 MiB took {registered_s:.2f}s over {len(durations)} ticks; "
        f"longest tick {max(durations) * 1000:.0f} ms"
    )
    assert len(durations) > 2 and max(durations) < registered_s / 4


def test_a_job_cancelled_while_it_registers_never_moves_an_alias(controller, tmp_path) -> None:
    from clusterft.controller.jobs import Jobs

    job_id = evaluated_job(controller, tmp_path, size_mb=256, promote={"auto": True})
    ticking = threading.Thread(target=tick_while_evaluating, args=(controller, job_id))
    ticking.start()
    model_dir = controller.registry.root / "demo"
    deadline = time.monotonic() + 60
    while not list(model_dir.glob(".staging-*")):  # the copy into the registry is under way
        assert time.monotonic() < deadline
        time.sleep(0.005)
    jobs = Jobs(controller.root, controller.registry.root)
    jobs.cancel(job_id)
    jobs.close()
    ticking.join(60)
    while list(model_dir.glob(".staging-*")):  # let the copy finish, then look again
        assert time.monotonic() < deadline
        controller.tick()
        time.sleep(0.05)
    controller.tick()
    assert controller.store.get(job_id).status is S.CANCELLED
    assert controller.registry.aliases("demo")["production"] is None


def test_a_stored_job_whose_name_the_registry_refuses_errors_instead_of_evaluating_forever(
    controller, tmp_path
) -> None:
    job_id = evaluated_job(controller, tmp_path)
    with sqlite3.connect(controller.store.path) as db:  # stored before submit checked names
        db.execute("UPDATE jobs SET name = 'my model' WHERE id = ?", (job_id,))
    tick_while_evaluating(controller, job_id, timeout_s=10)
    job, why = status(controller, job_id)
    assert job is S.ERROR and why.startswith("registration failed: invalid model name 'my model'")


# ---------------------------------------------------------------- resumed_from: where the driver starts


def publish(store: BundleStore, step: int, spec: JobSpec) -> str:
    """A valid bundle of `spec` at `step` (what a save of its run leaves)."""
    tmp = store.begin(step)
    store.put_bytes(tmp, "state/part-0.pt", b"weights")
    return store.location(store.publish(tmp, step, {"spec_hash": spec.spec_hash()}).name)


def relaunched_from(controller: Controller, spec: JobSpec) -> str | None:
    """The `resumed_from` the controller records as it relaunches the training driver of a failed job
    of `spec` (the driver it starts, a real one, is stopped at once)."""
    job = controller.store.submit(spec)
    as_user(controller).transition(job.id, S.SUBMITTED, Training())
    as_user(controller).transition(job.id, S.TRAINING, Failed("RuntimeError: worker died"))
    as_user(controller).transition(job.id, S.FAILED, Resuming(after_s=0.0, why="worker died"))
    deadline = time.monotonic() + 30
    while controller.store.get(job.id).status is S.RESUMING:  # the resume point is found off the tick
        assert time.monotonic() < deadline, "the training driver was not relaunched"
        controller.tick()
        time.sleep(0.02)
    run = controller.runs.pop(job.id)
    os.killpg(run.pid, signal.SIGKILL)  # its own process group (session)
    run.process.wait()
    as_user(controller).transition(job.id, S.TRAINING, Cancelled())
    return controller.store.get(job.id).resumed_from


def test_resumed_from_is_the_bundle_the_driver_starts_from(controller, tmp_path) -> None:
    """The controller shows the bundle the driver's `start_run` picks (the same decision, made without
    deleting or creating anything), not the newest bundle of the main bundles folder."""
    first = make_spec(output_dir=str(tmp_path / "out"))
    root = BundleStore(locate(first).bundle_root)
    for step in (2, 4):
        publish(root, step, first)
    weights_only = make_spec(
        output_dir=str(tmp_path / "out"), learning_rate=5e-3, resume={"weights_only": True}
    )
    assert relaunched_from(controller, weights_only) == root.location("step_000000004")  # a new run
    # Its first attempt saved into a run folder of its own: a relaunch continues that, not the first run.
    own_run = BundleStore(root.storage.child("run-0123abcd"))
    mine = publish(own_run, 2, weights_only)
    assert relaunched_from(controller, weights_only) == mine

    other = BundleStore(tmp_path / "other" / "bundles")
    source = publish(other, 8, make_spec(output_dir=str(tmp_path / "other")))
    picked = make_spec(output_dir=str(tmp_path / "out"), max_steps=3, resume={"from_checkpoint": source})
    assert relaunched_from(controller, picked) == source

    fresh = make_spec(output_dir=str(tmp_path / "out"), resume={"enabled": False}, overwrite_output_dir=True)
    assert relaunched_from(controller, fresh) is None  # the driver deletes the bundles and starts afresh
    assert [i.step for i in root.list()] == [2, 4] and own_run.list()  # the controller deletes nothing
