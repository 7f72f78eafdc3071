"""Leases: one controller acts on a job at a time. The store's compare-and-set claim, renewal,
expiry and release on both backends (a hand-moved clock), then two real `Controller`s on one store
with a live driver process: the second leaves the job alone while the first's lease is live, and
takes it over after the first is killed by re-attaching to the driver, never launching a second."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import clusterft.controller.controller as controller_module
from clusterft.controller.controller import Controller
from clusterft.controller.runs import RunFiles
from clusterft.controller.state import Cancelled, Evaluating, Failed, JobState, Resuming, Training
from clusterft.controller.store import JobStore, LeaseLost
from clusterft.controller.store_backend import is_store_url
from clusterft.controller.stored_spec import job_spec
from clusterft.storage.fs import atomic_write_text
from tests.controller.conftest import make_spec

S = JobState
HOST = socket.gethostname()


class HandClock:
    """Store time that moves only when the test says so."""

    def __init__(self, now: float = 1_795_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_live_lease_is_refused_to_others_renewed_by_its_holder_and_taken_once_expired(
    store_location: str,
) -> None:
    clock = HandClock()
    with JobStore(store_location, clock=clock) as store:
        job_id = store.submit(make_spec()).id
        assert store.lease(job_id) is None
        first = store.claim(job_id, "a", HOST, 11, 10.0)
        assert (first.holder, first.heartbeat_at, first.expires_at) == ("a", clock.now, clock.now + 10.0)

        clock.now += 9.0
        assert store.claim(job_id, "b", HOST, 22, 10.0) == first  # live: refused, nothing written
        renewed = store.claim(job_id, "a", HOST, 11, 10.0)
        assert renewed.expires_at == clock.now + 10.0 == first.expires_at + 9.0

        clock.now = renewed.expires_at - 0.001
        assert store.claim(job_id, "b", HOST, 22, 10.0).holder == "a"
        clock.now = renewed.expires_at  # expired: the first claim after it wins
        taken = store.claim(job_id, "b", HOST, 22, 10.0)
        assert (taken.holder, taken.pid, taken.expires_at) == ("b", 22, clock.now + 10.0)
        assert store.claim(job_id, "a", HOST, 11, 10.0).holder == "b"  # the old holder lost it

        store.release(job_id, "a")  # not a's any more: nothing happens
        assert store.lease(job_id) == taken
        assert store.claim(job_id, "c", HOST, 33, 10.0, dead="b").holder == "c"  # b is known dead
        store.release(job_id, "c")
        assert store.lease(job_id) is None
        assert store.claim(job_id, "a", HOST, 11, 10.0).holder == "a"  # released: free at once


def test_a_store_of_schema_3_gains_leases(tmp_path: Path, postgres_server) -> None:
    """Both backends upgrade a store of the previous schema: its jobs stay, leases work."""
    import sqlite3

    import psycopg

    from clusterft.controller.store_schema import MIGRATIONS, POSTGRES_MIGRATIONS, SCHEMA_VERSION, statements
    from tests.controller.conftest import new_postgres_store

    path = tmp_path / "jobs.db"
    raw = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:3]:
        for statement in statements(migration):
            raw.execute(statement)
    raw.execute("PRAGMA user_version = 3")
    raw.close()
    url = new_postgres_store(postgres_server)
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE clusterft_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO clusterft_schema VALUES (3)")
        db.execute(POSTGRES_MIGRATIONS[0][1])
    for location in (str(path), url):
        with JobStore(location) as store:
            assert store.schema_version == SCHEMA_VERSION == 4
            job_id = store.submit(make_spec()).id
            assert store.claim(job_id, "a", HOST, 1, 5.0).holder == "a"


def controllers_on(store_location: str, tmp_path: Path, lease_s: float) -> tuple[Controller, Controller]:
    """Two controllers sharing one job store (and its root's run files), as on two hosts."""
    if is_store_url(store_location):
        root, url = tmp_path / "controller", store_location
    else:
        root, url = Path(store_location).parent, None
    return tuple(  # type: ignore[return-value]
        Controller(root, tmp_path / "registry", env={}, store_url=url, lease_s=lease_s) for _ in range(2)
    )


@pytest.fixture
def launches(monkeypatch) -> list[int]:
    """The pid of every training driver the controllers launch. Each is a real process in its own
    session whose command line names its job, as a driver's does (what re-attaching checks), that
    runs until the test stops it: the lease logic, not a training run, is under test."""
    pids: list[int] = []

    def launch(files: RunFiles, job_id: str, store: object, env: dict[str, str]) -> subprocess.Popen[bytes]:
        files.dir.mkdir(parents=True, exist_ok=True)
        code = "import time; time.sleep(120)"
        process = subprocess.Popen([sys.executable, "-c", code, job_id], start_new_session=True)
        atomic_write_text(files.pid_file, str(process.pid))
        pids.append(process.pid)
        return process

    monkeypatch.setattr(controller_module, "launch", launch)
    yield pids
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_killed_controllers_running_job_is_taken_over_after_its_lease_without_a_second_driver(
    store_location: str, tmp_path: Path, launches: list[int], caplog
) -> None:
    lease_s = 1.0
    first, second = controllers_on(store_location, tmp_path, lease_s)
    try:
        job_id = first.store.submit(make_spec(output_dir=str(tmp_path / "out"))).id
        deadline = time.monotonic() + 30
        while not launches:  # the resume point is found off the tick
            assert time.monotonic() < deadline, "the training driver was not launched"
            first.tick()
            time.sleep(0.02)
        [driver] = launches
        assert first.store.get(job_id).status is S.TRAINING

        # While the first controller ticks, its lease is live: the second leaves the job alone.
        until = time.monotonic() + 2 * lease_s
        while time.monotonic() < until:
            first.tick()
            second.tick()
            time.sleep(0.1)
        assert job_id not in second.runs and launches == [driver]
        assert second.store.lease(job_id).holder == first.id
        said = [r.message for r in caplog.records if f"job {job_id} is leased by controller" in r.message]
        assert len(said) == 1  # said once, not at every tick

        # The first is killed: it stops ticking and never releases. The second waits out the lease
        # and re-attaches to the live driver.
        killed_at = time.monotonic()
        while job_id not in second.runs:
            assert time.monotonic() < killed_at + 5 * lease_s, "the second controller never took over"
            second.tick()
            time.sleep(0.05)
        takeover_s = time.monotonic() - killed_at
        print(f"takeover after {takeover_s:.2f}s (lease {lease_s}s)")
        assert 0.5 * lease_s < takeover_s < lease_s + 1.0
        run = second.runs[job_id]
        assert (run.pid, run.process) == (driver, None)  # re-attached, not launched
        assert launches == [driver] and second.store.get(job_id).status is S.TRAINING
        assert second.store.lease(job_id).holder == second.id

        # The first wakes up (a zombie): its lease is lost, so it stops acting on the job at once
        # and leaves the driver, now the second's, running.
        first.tick()
        assert job_id not in first.runs and job_id not in first.leased
        os.killpg(driver, 0)  # still alive
        second.tick()
        assert second.runs[job_id].pid == driver and launches == [driver]
    finally:
        first.close()
        second.close()


def test_a_clean_shutdown_hands_jobs_over_at_once_and_a_dead_local_holder_does_not_wait(
    store_location: str, tmp_path: Path
) -> None:
    first, second = controllers_on(store_location, tmp_path, lease_s=3600.0)
    store = JobStore(store_location)  # a user's, unfenced
    try:
        job_id = store.submit(make_spec()).id
        store.transition(job_id, S.SUBMITTED, Training())
        store.transition(job_id, S.TRAINING, Failed("worker died"))
        store.transition(job_id, S.FAILED, Resuming(after_s=3600.0, why="worker died"))  # waits: no launch
        first.tick()
        second.tick()
        assert store.lease(job_id).holder == first.id
        first.close()  # releases: no hour to wait
        second.tick()
        assert second.store.lease(job_id).holder == second.id

        # A holder on this host whose process is gone (a restarted actor's predecessor).
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        second.store.claim(job_id, "ghost", HOST, gone.pid, 3600.0, dead=second.id)
        assert second.store.lease(job_id).holder == "ghost"
        second.tick()
        assert second.store.lease(job_id).holder == second.id
    finally:
        first.close()
        second.close()
        store.close()


def waiting_job(store: JobStore, tmp_path: Path) -> str:
    """A job whose training failed and that waits an hour to resume: ticks claim it, launch nothing."""
    job_id = store.submit(make_spec(output_dir=str(tmp_path / "out"))).id
    store.transition(job_id, S.SUBMITTED, Training())
    store.transition(job_id, S.TRAINING, Failed("worker died"))
    store.transition(job_id, S.FAILED, Resuming(after_s=3600.0, why="worker died"))
    return job_id


def test_a_controller_that_stalled_past_its_lease_can_write_nothing_to_the_job(
    store_location: str, tmp_path: Path
) -> None:
    """Fencing: the first controller decides under its lease, stalls past it, the second takes the
    job over; every write the first then makes (a move, a log pointer) is refused by the store in the
    write's own transaction, and the job and its history are as the second left them."""
    lease_s = 0.5
    first, second = controllers_on(store_location, tmp_path, lease_s)
    user = JobStore(store_location)
    try:
        job_id = waiting_job(user, tmp_path)
        first.tick()
        assert user.lease(job_id).holder == first.id
        decided_on = first.store.get(job_id)  # what the first read before it stalled
        first.store.add_log(job_id, "train", tmp_path / "first.log")  # live lease: written

        time.sleep(lease_s + 0.1)  # the first stalls past its lease; the second takes the job over
        second.tick()
        assert user.lease(job_id).holder == second.id
        history = user.events(job_id)

        with pytest.raises(LeaseLost, match=f"may not write job {job_id}: its lease is {second.id[:8]}'s"):
            first.store.transition(job_id, S.RESUMING, Cancelled())
        with pytest.raises(LeaseLost):
            first.store.add_log(job_id, "train", tmp_path / "stale.log")
        with pytest.raises(LeaseLost):  # its decision, made on what it read, reaches the store too late
            first._give_up(decided_on, "the stale controller gives up")
        assert user.get(job_id).status is S.RESUMING and user.events(job_id) == history
        assert [log.path for log in user.logs(job_id)] == [str(tmp_path / "first.log")]

        # An expired lease nobody took is no licence either, until its holder claims it again.
        user.release(job_id, second.id)
        user.claim(job_id, second.id, HOST, 1, 0.01)
        time.sleep(0.05)
        with pytest.raises(LeaseLost, match="its lease is"):
            second.store.add_log(job_id, "train", tmp_path / "late.log")
        second.tick()  # claims again: its writes go through
        second.store.transition(job_id, S.RESUMING, Cancelled())
        assert user.get(job_id).status is S.CANCELLED
    finally:
        first.close()
        second.close()
        user.close()


def evaluated_job(store: JobStore, tmp_path: Path) -> str:
    """A full fine-tune whose training is done and which has no eval driver to run: its next step
    registers output_dir as a version of `demo`."""
    output = tmp_path / "demo"
    output.mkdir()
    (output / "config.json").write_text("{}")
    (output / "model.safetensors").write_bytes(b"weights")
    spec = make_spec(output_dir=str(output), finetuning_type="full", eval={"enabled": False})
    job_id = store.submit(spec).id
    store.transition(job_id, S.SUBMITTED, Training())
    store.transition(job_id, S.TRAINING, Evaluating(completed_steps=10))
    return job_id


def test_two_controllers_register_a_job_once_and_only_the_leaseholder_moves_its_alias_state(
    store_location: str, tmp_path: Path
) -> None:
    """Registration runs under the job's lease: the controller without it registers nothing, however
    it got there; the holder registers one version, found again (not doubled) on a retry. Reconciling
    the registry's aliases moves a job only under its lease too."""
    first, second = controllers_on(store_location, tmp_path, lease_s=3600.0)
    user = JobStore(store_location)
    try:
        job_id = evaluated_job(user, tmp_path)
        first.store.claim(job_id, first.id, HOST, first.pid, 3600.0)  # as its tick would
        job = user.get(job_id)
        spec = job_spec(job)
        with pytest.raises(LeaseLost):
            second._register(job, spec, {}, None)
        assert first.registry.versions("demo") == []
        version = first._register(job, spec, {}, None)
        assert first._register(job, spec, {}, None) == version  # a retry finds it
        deadline = time.monotonic() + 30
        while user.get(job_id).status is S.EVALUATING:
            assert time.monotonic() < deadline, "the job was not registered"
            first.tick()
            second.tick()
            time.sleep(0.02)
        assert [v.version for v in first.registry.versions("demo")] == [version.version]
        assert user.get(job_id).status is S.REGISTERED

        # A user promotes the version; the reconcile pass follows, but only where the lease is held.
        first.tick()  # the job settled: its lease is released at the end of the tick
        first.store.claim(job_id, first.id, HOST, first.pid, 3600.0)  # the first reconciles it now
        first.registry.promote("demo", version.version, "production")
        second.reconcile()
        assert user.get(job_id).status is S.REGISTERED
        first.reconcile()
        assert user.get(job_id).status is S.PROMOTED
    finally:
        first.close()
        second.close()
        user.close()
