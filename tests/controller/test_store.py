"""The job store on both backends (SQLite, and PostgreSQL on a real server: `store_location`):
submission, compare-and-set transitions across connections and processes, the append-only history,
log pointers, schema versioning. Then what is one backend's own: SQLite's journal mode and its
failed COMMIT, PostgreSQL's lock timeout and dropped connections."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
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
from clusterft.controller.store_postgres import postgres_sql
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
def store(store_location: str) -> JobStore:
    with JobStore(store_location, clock=Clock()) as opened:
        yield opened


def execute_raw(store: JobStore, sql: str, params: Sequence[Any] = ()) -> None:
    """Run `sql` (`?` placeholders) on the store's database over a connection of its own, committed:
    what a person with a database shell, or another program, does."""
    if store.path is not None:
        with closing(sqlite3.connect(store.path, isolation_level=None)) as db:
            db.execute(sql, tuple(params))
    else:
        with psycopg.connect(store.location, autocommit=True) as db:
            db.execute(postgres_sql(sql), tuple(params))


def set_schema_version(store: JobStore, version: int) -> None:
    if store.path is not None:
        execute_raw(store, f"PRAGMA user_version = {version}")
    else:
        execute_raw(store, "UPDATE clusterft_schema SET version = ?", (version,))


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


def test_two_connections_cannot_both_move_a_job(store_location: str) -> None:
    with JobStore(store_location) as first, JobStore(store_location) as second:
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


def test_processes_racing_on_the_same_jobs_each_job_moves_exactly_once(store_location: str) -> None:
    path = store_location
    with JobStore(path) as store:
        job_ids = [store.submit(make_spec()).id for _ in range(20)]
    context = multiprocessing.get_context("fork")
    contenders = 4
    barrier, wins = context.Barrier(contenders), context.Queue()
    processes = [
        context.Process(target=_race, args=(path, job_ids, barrier, wins)) for _ in range(contenders)
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
    refused = (sqlite3.IntegrityError, psycopg.errors.RaiseException)
    with pytest.raises(refused, match="append-only"):
        execute_raw(store, "UPDATE events SET reason = 'rewritten'")
    with pytest.raises(refused, match="append-only"):
        execute_raw(store, "DELETE FROM events")
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


def test_state_survives_reopening_and_the_schema_is_versioned(store_location: str) -> None:
    with JobStore(store_location) as store:
        job = store.submit(make_spec())
        moved = store.transition(job.id, S.SUBMITTED, Training(resumed_from="ckpt/1"))
        assert store.schema_version == SCHEMA_VERSION
    with JobStore(store_location) as again:
        assert again.schema_version == SCHEMA_VERSION
        assert again.get(job.id) == moved  # every field, timestamps to the last bit
        assert moved.state == Training(resumed_from="ckpt/1")
        assert [e.to_state for e in again.events(job.id)] == [S.SUBMITTED, S.TRAINING]


def test_a_newer_schema_is_refused_with_the_fix(store_location: str) -> None:
    with JobStore(store_location) as store:
        set_schema_version(store, SCHEMA_VERSION + 1)
    with pytest.raises(UserError, match=r"schema 5, newer than this clusterft's \(4\); upgrade clusterft"):
        JobStore(store_location)


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
        assert store.schema_version == SCHEMA_VERSION == 4
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
    execute_raw(store, "UPDATE jobs SET state_data = '{\"why\": ' WHERE id = ?", (bad.id,))
    execute_raw(store, "UPDATE jobs SET state = 'paused' WHERE id = ?", (newer.id,))
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


def test_processes_retrying_one_submission_make_one_job(store_location: str) -> None:
    path = store_location
    JobStore(path).close()
    context = multiprocessing.get_context("fork")
    barrier, ids = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_submit_keyed, args=(path, barrier, ids)) for _ in range(4)]
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


# ---------------------------------------------------------------- SQLite: the journal mode


MOUNTS = r"""overlay / overlay rw,relatime,lowerdir=/l,upperdir=/u,workdir=/w 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/sda1 /data ext4 rw,relatime 0 0
nas:/export/shared /data/shared nfs4 rw,vers=4.2,hard,proto=tcp 0 0
//filer/team /mnt/team\040drive cifs rw,vers=3.0 0 0
s3fs /mnt/bucket fuse.s3fs rw,nosuid,nodev 0 0
/dev/sdb1 /data/shared/local ext4 rw 0 0
tmpfs /scratch tmpfs rw 0 0
nas:/export/scratch /scratch nfs rw,vers=3 0 0
"""


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/data/shared/controller", "nfs4"),  # the longest mount point above the path
        ("/data/sharedother", "ext4"),  # a mount point is a whole path component, not a prefix
        ("/data/shared/local/ctl", "ext4"),  # a local disk mounted inside the NFS export
        ("/mnt/team drive/ctl", "cifs"),  # /proc/mounts writes the space as \040
        ("/mnt/bucket/ctl", "fuse.s3fs"),
        ("/scratch/ctl", "nfs"),  # two mounts on one point: the last one hides the first
        ("/home/user", "overlay"),
    ],
)
def test_the_filesystem_of_a_path_is_that_of_its_longest_mount_point(path: str, fstype: str) -> None:
    from pathlib import PurePosixPath

    from clusterft.controller.store_sqlite import mount_type

    assert mount_type(PurePosixPath(path), MOUNTS) == fstype


def test_wal_on_local_disks_a_rollback_journal_on_network_filesystems_and_wal_there_refused() -> None:
    from clusterft.controller.store_sqlite import choose_journal_mode, is_network_filesystem

    network = [
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "ceph",
        "glusterfs",
        "lustre",
    ]
    assert all(is_network_filesystem(fstype) for fstype in network)
    assert not any(
        is_network_filesystem(fstype) for fstype in ["ext4", "xfs", "btrfs", "overlay", "tmpfs", "zfs"]
    )
    assert choose_journal_mode("ext4", None, "/data/jobs.db") == "wal"
    assert choose_journal_mode(None, None, "/data/jobs.db") == "wal"  # no /proc/mounts (macOS)
    assert choose_journal_mode("nfs4", None, "/shared/jobs.db") == "delete"
    assert choose_journal_mode("nfs4", "delete", "/shared/jobs.db") == "delete"
    assert choose_journal_mode("ext4", "delete", "/data/jobs.db") == "delete"
    with pytest.raises(UserError) as refused:
        choose_journal_mode("nfs4", "wal", "/shared/jobs.db")
    message = str(refused.value)
    assert message.startswith("job store /shared/jobs.db: journal_mode wal on a nfs4 filesystem can corrupt")
    assert "leave journal_mode unset" in message and "CLUSTERFT_STORE_URL" in message


def test_a_sqlite_store_on_a_local_disk_is_in_wal_mode(tmp_path: Path) -> None:
    from clusterft.controller.store_sqlite import filesystem_type, is_network_filesystem

    assert not is_network_filesystem(filesystem_type(tmp_path) or "")  # else this test says nothing
    with JobStore(tmp_path / "jobs.db") as store:
        store.submit(make_spec())
    with closing(sqlite3.connect(tmp_path / "jobs.db")) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_filesystem_type_read_from_this_hosts_mounts_is_findmnts(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from clusterft.controller.store_sqlite import filesystem_type

    if shutil.which("findmnt") is None:
        pytest.skip("no findmnt (util-linux) to compare with")
    expected = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert filesystem_type(tmp_path) == expected


def test_delete_journal_mode_when_asked(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.db", journal_mode="delete") as store:
        job = store.submit(make_spec())
        store.transition(job.id, S.SUBMITTED, Training())
    with closing(sqlite3.connect(tmp_path / "jobs.db")) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


# ---------------------------------------------------------------- PostgreSQL: locks and connections


def test_postgres_lock_waits_end_at_the_busy_timeout_and_only_exclusive_writes_wait_for_each_other(
    postgres_server,
) -> None:
    """A job another session has locked: moving it waits `busy_timeout_s`, then fails whole and the
    next try works. An exclusive write (a submission) waits for another one; moving a job does not."""
    from clusterft.controller.store_postgres import EXCLUSIVE_WRITES
    from tests.controller.conftest import new_postgres_store

    url = new_postgres_store(postgres_server)
    with JobStore(url, busy_timeout_s=0.3) as store:
        job, other = store.submit(make_spec()), store.submit(make_spec())
        with psycopg.connect(url) as holder:  # one transaction until rollback
            holder.execute("SELECT * FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
            with pytest.raises(psycopg.errors.LockNotAvailable):
                store.transition(job.id, S.SUBMITTED, Training())
            store.transition(other.id, S.SUBMITTED, Training())  # another job's row: no wait
            holder.rollback()
            assert store.get(job.id).status is S.SUBMITTED  # nothing of the failed write stayed
            store.transition(job.id, S.SUBMITTED, Training())
            assert [e.to_state for e in store.events(job.id)] == [S.SUBMITTED, S.TRAINING]

            holder.execute("SELECT pg_advisory_xact_lock(%s)", (EXCLUSIVE_WRITES,))  # a submission's lock
            with pytest.raises(psycopg.errors.LockNotAvailable):
                store.submit(make_spec())
            store.transition(job.id, S.TRAINING, Cancelled())  # not exclusive: no wait
            with pytest.raises(psycopg.errors.LockNotAvailable):  # a resume checks folders: exclusive
                store.transition(job.id, S.CANCELLED, Resuming(0.0, "resumed by the user"))
            holder.rollback()
        assert len(store.list()) == 2
        store.transition(job.id, S.CANCELLED, Resuming(0.0, "resumed by the user"))


def test_postgres_a_connection_the_server_dropped_is_opened_again(postgres_server) -> None:
    """A server restart or failover drops the store's connection: the next read, and the next write,
    open a new one instead of failing until the process restarts."""
    from tests.controller.conftest import new_postgres_store

    url = new_postgres_store(postgres_server)

    def drop_the_stores_connections() -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            dropped = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchall()
        assert dropped == [(True,)]

    with JobStore(url) as store:
        job = store.submit(make_spec())
        drop_the_stores_connections()
        assert store.get(job.id).status is S.SUBMITTED
        drop_the_stores_connections()
        store.transition(job.id, S.SUBMITTED, Training())
        drop_the_stores_connections()
        assert store.submit(make_spec()).status is S.SUBMITTED
        assert [e.to_state for e in store.events(job.id)] == [S.SUBMITTED, S.TRAINING]


def test_postgres_store_messages_never_show_its_password() -> None:
    from clusterft.controller.store_backend import describe

    assert describe("postgresql://ctl:s3cr%40t@db:5432/jobs?sslmode=require") == (
        "postgresql://ctl:***@db:5432/jobs?sslmode=require"
    )
    assert describe("postgresql://db/jobs?password=s3cret&sslmode=require") == (
        "postgresql://db/jobs?password=***&sslmode=require"
    )
    assert describe("postgresql://ctl@db/jobs") == "postgresql://ctl@db/jobs"
    assert describe("/shared/controller/jobs.db") == "/shared/controller/jobs.db"
    with pytest.raises(UserError) as refused:  # nothing listens on port 1
        JobStore("postgresql://ctl:s3cret@127.0.0.1:1/jobs")
    message = str(refused.value)
    assert message.startswith("job store postgresql://ctl:***@127.0.0.1:1/jobs: cannot connect (")
    assert "--store-url / $CLUSTERFT_STORE_URL" in message and "s3cret" not in message


def test_a_store_url_of_another_kind_and_a_journal_mode_for_postgres_are_refused() -> None:
    with pytest.raises(UserError, match=r"a mysql:// store is not supported; give a postgresql:// URL"):
        JobStore("mysql://db/jobs")
    with pytest.raises(UserError, match=r"journal_mode is SQLite's; PostgreSQL has none"):
        JobStore("postgresql://db/jobs", journal_mode="delete")
