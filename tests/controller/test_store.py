"""The SQLite job store: submission, compare-and-set transitions across connections and processes,
the append-only history, log pointers, schema versioning."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from clusterft.controller.state import (
    Cancelled,
    Errored,
    Evaluating,
    Failed,
    IllegalTransition,
    JobState,
    Registered,
    Resuming,
    Training,
)
from clusterft.controller.store import JobStore, StaleState, UnknownJob, new_job_id
from clusterft.controller.store_schema import SCHEMA_VERSION
from clusterft.errors import UserError
from tests.controller.conftest import make_spec

S = JobState


class Clock:
    """A clock the test moves by hand: timestamps are exact."""

    def __init__(self, now: float = 1_795_000_000.0):
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    with JobStore(tmp_path / "shared" / "jobs.db", clock=Clock()) as opened:
        yield opened


def test_job_ids_are_short_sortable_and_utc() -> None:
    submitted = datetime(2026, 11, 28, 9, 15, 0, tzinfo=UTC).timestamp()
    job_id = new_job_id(submitted)
    assert re.fullmatch(r"job-20261128-091500-[0-9a-f]{4}", job_id)
    assert new_job_id(submitted + 1) > job_id
    assert len(job_id) == 24


def test_submit_records_the_spec_and_its_hash(store: JobStore) -> None:
    spec = make_spec(promote={"model_name": "quickstart"})
    job = store.submit(spec, "model_name_or_path: models/tiny-llama\n")
    assert job.status is S.SUBMITTED and job.attempt == 0 and job.restarts == 0
    assert job.name == "quickstart"
    assert job.spec_yaml == "model_name_or_path: models/tiny-llama\n"
    assert job.spec_hash == spec.spec_hash()
    assert job.result == {} and job.resumed_from is None
    assert store.get(job.id) == job
    # Default name: the output directory's last part; default YAML: the resolved spec.
    other = store.submit(make_spec())
    assert other.name == "demo"
    assert "model_name_or_path: models/tiny-llama" in other.spec_yaml


def test_unknown_job_is_a_user_error_with_the_way_to_find_ids(store: JobStore) -> None:
    with pytest.raises(UnknownJob, match=r"no job 'job-x'; `clusterft jobs list` shows the job ids"):
        store.get("job-x")
    with pytest.raises(UnknownJob):
        store.transition("job-x", S.SUBMITTED, Training())


def test_a_job_through_failures_to_registered_with_its_history(store: JobStore) -> None:
    job = store.submit(make_spec())
    steps = [
        (S.SUBMITTED, Training()),
        (S.TRAINING, Failed("RuntimeError: driver died")),
        (S.FAILED, Resuming(after_s=2.0, why="RuntimeError: driver died")),
        (S.RESUMING, Training(resumed_from="ckpt/checkpoint_000050")),
        (S.TRAINING, Evaluating(completed_steps=10)),
        (S.EVALUATING, Registered("demo", "v0001", why="not promoted: exact_match >= 0.8: got 0.5")),
    ]
    for expected, new in steps:
        job = store.transition(job.id, expected, new)
        assert job.state == new
    assert (job.attempt, job.restarts) == (2, 1)
    assert job.resumed_from == "ckpt/checkpoint_000050"
    assert job.reason == "not promoted: exact_match >= 0.8: got 0.5"
    events = store.events(job.id)
    assert [(e.from_state, e.to_state, e.attempt) for e in events] == [
        (None, S.SUBMITTED, 0),
        (S.SUBMITTED, S.TRAINING, 1),
        (S.TRAINING, S.FAILED, 1),
        (S.FAILED, S.RESUMING, 1),
        (S.RESUMING, S.TRAINING, 2),
        (S.TRAINING, S.EVALUATING, 2),
        (S.EVALUATING, S.REGISTERED, 2),
    ]
    assert events[2].reason == "RuntimeError: driver died"
    assert events[4].data == {"resumed_from": "ckpt/checkpoint_000050"}
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert len({e.seq for e in events}) == len(events)


def test_results_merge_across_transitions(store: JobStore) -> None:
    job = store.submit(make_spec())
    store.transition(job.id, S.SUBMITTED, Training())
    store.transition(job.id, S.TRAINING, Evaluating(10), result={"completed_steps": 10})
    job = store.transition(job.id, S.EVALUATING, Registered("demo", "v0001"), result={"eval": {"loss": 0.5}})
    assert job.result == {"completed_steps": 10, "eval": {"loss": 0.5}}


def test_stale_expected_state_is_refused_and_changes_nothing(store: JobStore) -> None:
    job = store.submit(make_spec())
    store.transition(job.id, S.SUBMITTED, Training())
    with pytest.raises(StaleState) as caught:
        store.transition(job.id, S.SUBMITTED, Cancelled())
    assert str(caught.value).startswith(f"job {job.id} is training, not submitted")
    assert isinstance(caught.value, UserError)
    assert store.get(job.id).status is S.TRAINING
    assert len(store.events(job.id)) == 2


def test_illegal_transition_is_refused_before_touching_the_database(store: JobStore) -> None:
    job = store.submit(make_spec())
    with pytest.raises(IllegalTransition, match="from submitted to evaluating"):
        store.transition(job.id, S.SUBMITTED, Evaluating(0))
    assert store.get(job.id).status is S.SUBMITTED


def test_two_connections_cannot_both_move_a_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with JobStore(path) as first, JobStore(path) as second:
        job = first.submit(make_spec())
        first.transition(job.id, S.SUBMITTED, Training())
        with pytest.raises(StaleState):
            second.transition(job.id, S.SUBMITTED, Cancelled("user"))
        # The second sees the first's move and can act on it.
        assert second.get(job.id).status is S.TRAINING
        second.transition(job.id, S.TRAINING, Cancelled("user"))
        assert first.get(job.id).status is S.CANCELLED


def _race(path: str, job_ids: list[str], barrier: multiprocessing.synchronize.Barrier, wins: object) -> None:
    """One contender: open its own store, wait for the others, try to move every job."""
    with JobStore(path, busy_timeout_s=20) as store:
        barrier.wait()
        for job_id in job_ids:
            try:
                store.transition(job_id, S.SUBMITTED, Training())
                wins.put(job_id)  # type: ignore[attr-defined]
            except StaleState:
                pass


def test_processes_racing_on_the_same_jobs_each_job_moves_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with JobStore(path) as store:
        job_ids = [store.submit(make_spec()).id for _ in range(20)]
    context = multiprocessing.get_context("fork")
    contenders = 4
    barrier, wins = context.Barrier(contenders), context.Queue()
    processes = [
        context.Process(target=_race, args=(str(path), job_ids, barrier, wins)) for _ in range(contenders)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    won = [wins.get(timeout=5) for _ in range(len(job_ids))]
    assert wins.empty()
    assert sorted(won) == sorted(job_ids)
    with JobStore(path) as store:
        for job_id in job_ids:
            job = store.get(job_id)
            assert (job.status, job.attempt) == (S.TRAINING, 1)
            assert [e.to_state for e in store.events(job_id)] == [S.SUBMITTED, S.TRAINING]


def test_events_are_append_only(store: JobStore) -> None:
    job = store.submit(make_spec())
    raw = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("UPDATE events SET reason = 'rewritten'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM events")
    raw.close()
    assert len(store.events(job.id)) == 1


def test_list_filters_and_unsettled_is_what_a_restarted_controller_resumes(store: JobStore) -> None:
    jobs = [store.submit(make_spec()) for _ in range(4)]
    store.transition(jobs[0].id, S.SUBMITTED, Training())
    store.transition(jobs[1].id, S.SUBMITTED, Errored("bad spec"))
    store.transition(jobs[2].id, S.SUBMITTED, Cancelled())
    assert [j.id for j in store.list()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in store.list(limit=2)] == [jobs[3].id, jobs[2].id]
    assert [j.id for j in store.list([S.ERROR, S.CANCELLED])] == [jobs[2].id, jobs[1].id]
    assert [j.id for j in store.unsettled()] == [jobs[0].id, jobs[3].id]


def test_log_pointers_per_attempt(store: JobStore) -> None:
    job = store.submit(make_spec())
    store.transition(job.id, S.SUBMITTED, Training())
    store.add_log(job.id, "driver", "/shared/logs/a1-driver.log")
    store.transition(job.id, S.TRAINING, Failed("boom"))
    store.transition(job.id, S.FAILED, Resuming(1.0, "boom"))
    store.transition(job.id, S.RESUMING, Training())
    store.add_log(job.id, "train", "/shared/logs/a2-train.log")
    store.add_log(job.id, "eval", "/shared/logs/eval.log", attempt=2)
    logs = [(log.attempt, log.kind, log.path) for log in store.logs(job.id)]
    assert logs == [  # in the order the phases ran, not by name ("eval" < "train")
        (1, "driver", "/shared/logs/a1-driver.log"),
        (2, "train", "/shared/logs/a2-train.log"),
        (2, "eval", "/shared/logs/eval.log"),
    ]


def test_state_survives_reopening_and_the_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with JobStore(path) as store:
        job = store.submit(make_spec())
        store.transition(job.id, S.SUBMITTED, Training(resumed_from="ckpt/1"))
        assert store.schema_version == SCHEMA_VERSION
    with JobStore(path) as again:
        assert again.get(job.id).state == Training(resumed_from="ckpt/1")
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_newer_schema_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    JobStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(UserError, match=r"newer than this clusterft's .*; upgrade clusterft"):
        JobStore(path)


def test_delete_journal_mode_for_network_filesystems(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.db", journal_mode="delete") as store:
        job = store.submit(make_spec())
        store.transition(job.id, S.SUBMITTED, Training())
    assert sqlite3.connect(tmp_path / "jobs.db").execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_schema_1_store_is_migrated_and_its_jobs_specs_count_as_unversioned(tmp_path: Path) -> None:
    import yaml

    from clusterft.controller.store_schema import MIGRATIONS, statements
    from clusterft.controller.stored_spec import SPEC_SCHEMA_VERSION, dump_spec

    path = tmp_path / "jobs.db"
    raw = sqlite3.connect(path, isolation_level=None)
    for statement in statements(MIGRATIONS[0]):
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    old_spec = yaml.safe_load(dump_spec(make_spec()))
    del old_spec["promote"]["auto"]  # a field that clusterft did not have
    raw.execute(
        "INSERT INTO jobs VALUES"
        " ('job-old', 'demo', ?, 'h', 'submitted', '{}', 0, 0, NULL, '{}', NULL, 1.0, 1.0)",
        (yaml.safe_dump(old_spec),),
    )
    raw.close()
    with JobStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 3
        assert store.get("job-old").spec_schema == 0
        assert store.submit(make_spec()).spec_schema == SPEC_SCHEMA_VERSION
        upgraded = store.upgrade_spec("job-old")  # nothing to drop; a gateless job keeps promoting
        auto = make_spec(promote={"auto": True})
        assert upgraded.spec_schema == SPEC_SCHEMA_VERSION and upgraded.spec_yaml == dump_spec(auto)
        [warning] = store.events("job-old")
        assert warning.reason == (
            "spec stored by an older clusterft (spec schema 0): set promote.auto: true, which is what "
            "that clusterft did without it"
        )


def test_stored_specs_load_tolerantly_only_when_older() -> None:
    import yaml

    from clusterft.controller.stored_spec import SPEC_SCHEMA_VERSION, SpecSchemaError, dump_spec, load_spec

    raw = yaml.safe_load(dump_spec(make_spec()))
    del raw["promote"]["auto"]  # schema 0 had no promote.auto
    raw["checkpoint"]["sync_to_s3"] = True
    old = yaml.safe_dump(raw)
    loaded = load_spec(old, 0)
    assert dict(loaded.dropped) == {"checkpoint.sync_to_s3": True}
    assert loaded.spec == make_spec(promote={"auto": True})
    # Written by this version, an unknown key is a bug to see, not history to forgive.
    with pytest.raises(SpecSchemaError, match=r"(?s)does not validate .*checkpoint\.sync_to_s3"):
        load_spec(old, SPEC_SCHEMA_VERSION)
    with pytest.raises(
        SpecSchemaError, match=r"newer clusterft \(spec schema 3; this one reads up to 2\); upgrade"
    ):
        load_spec(dump_spec(make_spec()), SPEC_SCHEMA_VERSION + 1)
    del raw["checkpoint"]["sync_to_s3"], raw["train"]  # still invalid after dropping: say so
    with pytest.raises(SpecSchemaError, match=r"submit its YAML again"):
        load_spec(yaml.safe_dump(raw), 0)


# ---------------------------------------------------------------- hardening: no job is ever lost


def test_a_failed_commit_is_rolled_back_and_the_next_write_works(tmp_path: Path) -> None:
    """A COMMIT that fails (here: a reader's lock in rollback-journal mode) must not leave the
    transaction open: its changes would show as if written, and every later BEGIN would fail."""
    path = tmp_path / "jobs.db"
    with JobStore(path, journal_mode="delete", busy_timeout_s=0.1) as store:
        job = store.submit(make_spec())
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM jobs").fetchall()  # a SHARED lock: COMMIT cannot take EXCLUSIVE
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.transition(job.id, S.SUBMITTED, Training())
        reader.execute("COMMIT")
        reader.close()
        assert store.get(job.id).status is S.SUBMITTED  # nothing of the failed write stayed
        store.transition(job.id, S.SUBMITTED, Training())
        assert [e.to_state for e in store.events(job.id)] == [S.SUBMITTED, S.TRAINING]


def test_an_unreadable_row_is_left_out_of_lists_and_named_by_get(store: JobStore) -> None:
    from clusterft.controller.store import UnreadableJob

    good, bad, newer = (store.submit(make_spec()) for _ in range(3))
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET state_data = '{\"why\": ' WHERE id = ?", (bad.id,))
        db.execute("UPDATE jobs SET state = 'paused' WHERE id = ?", (newer.id,))
    assert [j.id for j in store.list()] == [good.id]
    assert [j.id for j in store.unsettled()] == [good.id]
    rows = {row.job_id: row for row in store.unreadable()}
    assert (rows[bad.id].state, rows[bad.id].corrupt) == ("submitted", {"state_data": '{"why": '})
    assert "state_data" in rows[bad.id].error
    assert (rows[newer.id].state, rows[newer.id].corrupt) == ("paused", {})
    with pytest.raises(UnreadableJob, match=rf"job {bad.id}'s record in .* cannot be read: state_data"):
        store.get(bad.id)


def test_an_idempotency_key_gives_back_the_first_job_never_a_second(store: JobStore) -> None:
    from clusterft.controller.store import IdempotencyKeyReused

    first = store.submit(make_spec(), idempotency_key="req-1")
    assert store.submit(make_spec(), idempotency_key="req-1") == first
    assert [j.id for j in store.list()] == [first.id]
    with pytest.raises(IdempotencyKeyReused, match=rf"'req-1' was used for job {first.id} with another spec"):
        store.submit(make_spec(max_steps=5), idempotency_key="req-1")
    assert store.submit(make_spec(), idempotency_key="req-2").id != first.id


def _submit_keyed(path: str, barrier: multiprocessing.synchronize.Barrier, ids: object) -> None:
    with JobStore(path, busy_timeout_s=20) as store:
        barrier.wait()
        ids.put(store.submit(make_spec(), idempotency_key="retried").id)  # type: ignore[attr-defined]


def test_processes_retrying_one_submission_make_one_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    JobStore(path).close()
    context = multiprocessing.get_context("fork")
    barrier, ids = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_submit_keyed, args=(str(path), barrier, ids)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert len({ids.get(timeout=5) for _ in range(4)}) == 1
    with JobStore(path) as store:
        assert len(store.list()) == 1


def test_an_unsettled_jobs_folders_are_refused_to_a_second_job(store: JobStore) -> None:
    from clusterft.controller.store import FolderInUse

    folders = {"train.output_dir": "/runs/a", "checkpoint.storage_path/name": "/ckpt/a"}
    first = store.submit(make_spec(), folders=folders)
    with pytest.raises(FolderInUse) as refused:
        store.submit(make_spec(), folders={**folders, "train.output_dir": "/runs/b"})
    message = str(refused.value)
    assert f"checkpoint.storage_path/name /ckpt/a belongs to job {first.id} (submitted)" in message
    assert f"`clusterft jobs cancel {first.id}`" in message and "set another checkpoint" in message
    store.submit(make_spec(), folders={"train.output_dir": "/runs/b", "checkpoint.storage_path/name": "/b"})
    store.transition(first.id, S.SUBMITTED, Cancelled())
    second = store.submit(make_spec(), folders=folders)  # a settled job's folders are free again
    with pytest.raises(FolderInUse, match=f"train.output_dir /runs/a belongs to job {second.id}"):
        store.transition(first.id, S.CANCELLED, Resuming(0.0, "resumed by the user"))
    assert store.get(first.id).status is S.CANCELLED


@pytest.mark.parametrize(
    ("spec", "name", "where"),
    [
        ({}, "my model", "--name / the request's `name`"),
        ({"promote": {"model_name": "team/model"}}, None, "promote.model_name"),
        ({"output_dir": "saves/.hidden"}, None, "the last part of train.output_dir"),
    ],
)
def test_a_job_name_the_registry_would_refuse_is_refused_at_submit(
    store: JobStore, spec: dict, name: str | None, where: str
) -> None:
    with pytest.raises(UserError, match=r"invalid model name") as refused:
        store.submit(make_spec(**spec), name=name)
    assert f"(from {where})" in str(refused.value)
    assert store.list() == []


def test_a_spec_stored_before_promote_auto_keeps_promoting_only_if_it_had_no_gates() -> None:
    """Spec schema 2: a job without gates no longer promotes unless promote.auto says so; one stored
    before (when it would have) keeps that meaning, one with gates keeps its gates' verdict."""
    import yaml

    from clusterft.controller.stored_spec import dump_spec, load_spec

    def stored_by_schema_1(spec):
        raw = yaml.safe_load(dump_spec(spec))
        del raw["promote"]["auto"]
        return yaml.safe_dump(raw)

    gateless = load_spec(stored_by_schema_1(make_spec()), 1)
    assert gateless.spec.promote.auto is True and dict(gateless.kept_meaning) == {"promote.auto": True}
    gated = make_spec(promote={"gates": ["loss <= 1.0"]})
    assert load_spec(stored_by_schema_1(gated), 1).spec.promote.auto is False
    assert load_spec(dump_spec(make_spec()), 2).spec.promote.auto is False


def test_a_stored_spec_that_is_not_yaml_is_a_spec_schema_error() -> None:
    from clusterft.controller.stored_spec import SPEC_SCHEMA_VERSION, SpecSchemaError, load_spec

    with pytest.raises(SpecSchemaError, match="not valid YAML"):
        load_spec("model: [unclosed", SPEC_SCHEMA_VERSION)
    with pytest.raises(SpecSchemaError, match="a str, not a mapping"):
        load_spec("just text", SPEC_SCHEMA_VERSION)
