"""The job store: the jobs, their history and log pointers, outliving any controller. SQLite in the
controller root by default (one host: store_sqlite.py), or PostgreSQL for a cluster
(store_postgres.py); one API and the same rules on both (the seam: store_backend.py).

Every state change is one transaction that checks the job's current state first (compare-and-set),
so two controllers (a restarted actor and its zombie predecessor, or a controller and a user's
`jobs cancel`) can never both move a job: the second gets `StaleState`. The job's row is locked
while the move is checked and written, and a write waits up to `busy_timeout_s` for its locks; one
that fails, its COMMIT included, is rolled back whole.

A submission is one transaction too: a retried one with the same idempotency key finds the job the
first made, and one whose run would write the folders of an unsettled job is refused (`FolderInUse`).
A row that cannot be read (a torn or hand-edited JSON column, or a state a newer clusterft wrote) is
left out of `list` and reported by `unreadable`, so one bad row hides one job, not all of them.

A job's lease (`claim`, `release`) says which controller acts on it: claimed in one compare-and-set
when free, expired or already the claimer's. Expiry is read on the claiming process's clock, so the
hosts of controllers sharing a store keep their clocks in step (NTP) well within a lease. A
controller's store is fenced (`JobStore(..., fence=its id)`): each of its writes to a job (a move, a
log pointer, a spec upgrade, a setting aside) checks, in the same transaction and under the lease
row's lock, that its lease on the job is live, and raises `LeaseLost` otherwise; so a controller that
stalled past its lease (a paused process, a partitioned node) can write nothing once another took
the job over, whatever it believed when it decided.

Its tables and their migrations are in store_schema.py; how a row reads as a job, an event or a log
pointer (and an unreadable row as what is wrong with it) in store_rows.py.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from clusterft.config.spec import JobSpec
from clusterft.controller.state import (
    SETTLED,
    Errored,
    Job,
    JobState,
    State,
    Submitted,
    Training,
    check_transition,
    next_counters,
    state_from_json,
)
from clusterft.controller.store_backend import (
    POSTGRES_SCHEMES,
    STORE_URL_ENV,
    Backend,
    Transaction,
    describe,
    is_store_url,
)
from clusterft.controller.store_postgres import PostgresBackend
from clusterft.controller.store_rows import (
    Event,
    Lease,
    LogPointer,
    UnreadableRow,
    append_event,
    event_from_row,
    lease_from_row,
    log_from_row,
    read_row,
)
from clusterft.controller.store_sqlite import SqliteBackend
from clusterft.controller.stored_spec import SPEC_SCHEMA_VERSION, dump_spec, load_spec
from clusterft.errors import UserError
from clusterft.registry.registry import RegistryError, check_model_name


class UnknownJob(UserError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r}; `clusterft jobs list` shows the job ids")


class UnreadableJob(UserError):
    def __init__(self, job_id: str, where: str, error: str):
        super().__init__(
            f"job {job_id}'s record in {where} cannot be read: {error}; the controller moves a damaged "
            f"job to error (then `clusterft jobs resume {job_id}`) and leaves one a newer clusterft wrote"
        )


class IdempotencyKeyReused(UserError):
    def __init__(self, key: str, job_id: str):
        super().__init__(
            f"idempotency key {key!r} was used for job {job_id} with another spec or name; a retry must "
            "send the same request, and a new job needs a new key"
        )


class FolderInUse(UserError):
    """Another unsettled job's run writes a folder this job's run would write."""

    def __init__(self, folder: str, path: str, job_id: str, state: str):
        self.job_id = job_id
        super().__init__(
            f"{folder} {path} belongs to job {job_id} ({state}), which has not finished: two runs in one "
            f"folder overwrite each other's checkpoints and exports. Wait for it, cancel it "
            f"(`clusterft jobs cancel {job_id}`), or set another {folder} for this job"
        )


class StaleState(UserError):
    """The job was not in the state the caller expected: someone else moved it first."""

    def __init__(self, job_id: str, expected: JobState, actual: JobState):
        self.job_id, self.expected, self.actual = job_id, expected, actual
        super().__init__(
            f"job {job_id} is {actual}, not {expected}: another controller or command moved it first; "
            f"see `clusterft jobs status {job_id}`"
        )


class LeaseLost(UserError):
    """A fenced store's write to a job whose lease its controller no longer holds."""

    def __init__(self, job_id: str, holder: str, lease: Lease | None):
        self.job_id = job_id
        now = "no controller holds it" if lease is None else f"its lease is {lease.holder[:8]}'s"
        super().__init__(
            f"controller {holder[:8]} may not write job {job_id}: {now} (lost, or expired "
            f"unrenewed); the controller holding the lease acts on it"
        )


def new_job_id(now: float) -> str:
    """`job-20261128-091500-ab12`: sorts by submission time (UTC), short enough to type."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d-%H%M%S")
    return f"job-{stamp}-{secrets.token_hex(2)}"


def default_job_name(spec: JobSpec) -> str:
    """The registry name if the spec sets one, else the output directory's last part."""
    return spec.promote.model_name or Path(spec.train.output_dir).name


def check_job_name(name: str | None, spec: JobSpec) -> str:
    """The job's name (`name`, else `default_job_name`), which is also its registry model name:
    refused now, naming where it came from, rather than when the job registers after training."""
    if name:
        where, fix = "--name / the request's `name`", "another name"
    elif spec.promote.model_name:
        name, where, fix = spec.promote.model_name, "promote.model_name", "another promote.model_name"
    else:
        name, where = Path(spec.train.output_dir).name, "the last part of train.output_dir"
        fix = "promote.model_name (or --name)"
    try:
        check_model_name(name)
    except RegistryError as err:
        raise UserError(
            f"{err}; the job's name (from {where}) is its registry model name: set {fix}"
        ) from None
    return name


def open_backend(
    location: str | Path, *, busy_timeout_s: float, journal_mode: Literal["wal", "delete"] | None
) -> Backend:
    """The backend for `location`: SQLite for a path, PostgreSQL for a postgresql:// URL."""
    if not is_store_url(location):
        return SqliteBackend(Path(location), busy_timeout_s=busy_timeout_s, journal_mode=journal_mode)
    scheme = urlsplit(str(location)).scheme
    if scheme not in POSTGRES_SCHEMES:
        raise UserError(
            f"job store {describe(location)}: a {scheme}:// store is not supported; give a postgresql:// "
            f"URL (--store-url or ${STORE_URL_ENV}), or leave it unset for SQLite in the controller root"
        )
    if journal_mode is not None:
        raise UserError(f"job store {describe(location)}: journal_mode is SQLite's; PostgreSQL has none")
    return PostgresBackend(str(location), busy_timeout_s=busy_timeout_s)


class JobStore:
    """Jobs, their event history and log pointers, in a SQLite file (`location` a path) or a
    PostgreSQL database (`location` a postgresql:// URL). Safe to share between threads (one
    connection behind a lock) and processes (the database's locks).

    `journal_mode` (SQLite only): default WAL, a rollback journal on a network filesystem, where WAL
    is refused (store_sqlite.py). `fence`: a controller's lease holder id; each write to a job then
    requires that holder's live lease on it (`LeaseLost`). Submissions are not fenced (a new job has
    no lease), nor are the stores of user commands (None)."""

    def __init__(
        self,
        location: str | Path,
        *,
        busy_timeout_s: float = 30.0,
        journal_mode: Literal["wal", "delete"] | None = None,
        clock: Callable[[], float] = time.time,
        fence: str | None = None,
    ):
        self._sql = open_backend(location, busy_timeout_s=busy_timeout_s, journal_mode=journal_mode)
        self._clock = clock
        self.fence = fence
        self.location = self._sql.location
        """What the store was opened with (a path, or a URL with its password): what a driver opens."""
        self.where = self._sql.where
        """The store as messages name it (a URL without its password)."""
        self.path = self._sql.path
        """The SQLite file; None for PostgreSQL."""

    def close(self) -> None:
        self._sql.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _locked_row(self, db: Transaction, job_id: str, columns: str = "*") -> Any:
        """The job's row, locked until the transaction ends; None if there is no such job."""
        sql = f"SELECT {columns} FROM jobs WHERE id = ?{self._sql.row_lock}"
        return db.execute(sql, (job_id,)).fetchone()

    def _check_fence(self, db: Transaction, job_id: str, now: float) -> None:
        """`LeaseLost` unless this store is unfenced or its holder's lease on the job is live at `now`.
        The lease row stays locked until the write commits, so a claim by another controller waits
        for the write, and then finds the lease it was written under."""
        if self.fence is None:
            return
        sql = f"SELECT * FROM leases WHERE job_id = ?{self._sql.row_lock}"
        row = db.execute(sql, (job_id,)).fetchone()
        lease = lease_from_row(row) if row is not None else None
        if lease is None or lease.holder != self.fence or lease.expires_at <= now:
            raise LeaseLost(job_id, self.fence, lease)

    @property
    def schema_version(self) -> int:
        return self._sql.schema_version()

    # ------------------------------------------------------------ jobs

    def submit(
        self,
        spec: JobSpec,
        spec_yaml: str | None = None,
        *,
        name: str | None = None,
        idempotency_key: str | None = None,
        folders: Mapping[str, str] | None = None,
    ) -> Job:
        """Record a new job in `submitted` and return it. `spec_yaml` is kept as the user wrote it
        (default: the resolved spec dumped to YAML).

        `idempotency_key`: a submission retried with the same key returns the job the first one
        made, never a second job (`IdempotencyKeyReused` if its spec or name differ). `folders`:
        what the job's run writes (`{"train.output_dir": path, ...}`); `FolderInUse` while an
        unsettled job's run writes one of them."""
        if spec_yaml is None:
            spec_yaml = dump_spec(spec)
        name = check_job_name(name, spec)
        now = self._clock()
        state = Submitted()
        with self._sql.write(exclusive=True) as db:
            first = None
            if idempotency_key is not None:
                first = db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if first is not None and (first["spec_hash"], first["name"]) != (spec.spec_hash(), name):
                    raise IdempotencyKeyReused(idempotency_key, first["id"])
            if first is not None:
                job_id = first["id"]  # a retry: the first submission's job, and nothing written
            else:
                folders = dict(folders or {})
                _check_folders_free(db, folders)
                job_id = new_job_id(now)
                while db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                    job_id = new_job_id(now)  # same second, same 4 hex digits: draw again
                db.execute(
                    "INSERT INTO jobs (id, name, spec_yaml, spec_hash, state, state_data, attempt, restarts,"
                    " reason, result, resumed_from, created_at, updated_at, spec_schema, idempotency_key,"
                    " folders) VALUES (?, ?, ?, ?, ?, ?, 0, 0, NULL, '{}', NULL, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        name,
                        spec_yaml,
                        spec.spec_hash(),
                        state.kind,
                        json.dumps(state.data()),
                        now,
                        now,
                        SPEC_SCHEMA_VERSION,
                        idempotency_key,
                        json.dumps(folders),
                    ),
                )
                append_event(db, job_id, now, None, state, attempt=0)
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        """The job; `UnknownJob` if there is none, `UnreadableJob` if its row cannot be read."""
        rows = self._sql.read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise UnknownJob(job_id)
        job = read_row(rows[0])
        if isinstance(job, UnreadableRow):
            raise UnreadableJob(job_id, self.where, job.error)
        return job

    def _rows(
        self, states: Iterable[JobState] | None = None, limit: int | None = None
    ) -> list[Job | UnreadableRow]:
        sql, params = "SELECT * FROM jobs", []
        if states is not None:
            states = list(states)
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            params += [str(s) for s in states]
        sql += " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [read_row(row) for row in self._sql.read(sql, params)]

    def list(self, states: Iterable[JobState] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first; only those in `states` when given. Rows that cannot be read are left
        out (`unreadable` names them)."""
        return [job for job in self._rows(states, limit) if isinstance(job, Job)]

    def unreadable(self) -> list[UnreadableRow]:
        """The rows `list` leaves out, and why, newest first."""
        return [row for row in self._rows() if isinstance(row, UnreadableRow)]

    def unsettled(self) -> list[Job]:
        """Jobs the controller still owns (not settled), oldest first: what a restarted
        controller picks up."""
        return list(reversed(self.list(set(JobState) - SETTLED)))

    def transition(
        self, job_id: str, expected: JobState, new: State, *, result: Mapping[str, Any] | None = None
    ) -> Job:
        """Move a job from `expected` to `new` in one transaction, or raise: `StaleState` if it is no
        longer in `expected`, `IllegalTransition` if the state machine forbids the move,
        `FolderInUse` if a settled job would run again in an unsettled job's folders, and `LeaseLost`
        if the store is fenced and its holder's lease on the job is not live. `result`
        keys are merged into the job's result JSON (eval metrics, registered version, ...)."""
        with self.moving(job_id, expected, new, result=result):
            pass
        return self.get(job_id)

    @contextmanager
    def moving(
        self, job_id: str, expected: JobState, new: State, *, result: Mapping[str, Any] | None = None
    ) -> Iterator[None]:
        """`transition` with the caller's effect inside it: the body runs while the job is in
        `expected` (checked first) and nobody else can move it (the job's row is locked), and the
        move is written after it, or not at all if it raises. The controller moves an alias this
        way, so a job cancelled meanwhile never has its version promoted."""
        check_transition(expected, new.kind)
        now = self._clock()
        resumes = expected in SETTLED and new.kind not in SETTLED  # a user's resume: the run starts again
        with self._sql.write(exclusive=resumes) as db:
            row = self._locked_row(db, job_id)
            if row is None:
                raise UnknownJob(job_id)
            actual = JobState(row["state"])
            if actual is not expected:
                raise StaleState(job_id, expected, actual)
            self._check_fence(db, job_id, now)
            if resumes:
                _check_folders_free(db, json.loads(row["folders"]), but_job=job_id)
            yield
            attempt, restarts = next_counters(actual, new.kind, row["attempt"], row["restarts"])
            merged = {**json.loads(row["result"]), **(result or {})}
            resumed_from = new.resumed_from if isinstance(new, Training) else row["resumed_from"]
            cursor = db.execute(
                "UPDATE jobs SET state = ?, state_data = ?, attempt = ?, restarts = ?, reason = ?,"
                " result = ?, resumed_from = ?, updated_at = ? WHERE id = ? AND state = ?",
                (
                    new.kind,
                    json.dumps(new.data()),
                    attempt,
                    restarts,
                    new.reason,
                    json.dumps(merged),
                    resumed_from,
                    now,
                    job_id,
                    expected,
                ),
            )
            assert cursor.rowcount == 1, "the state was read under the row's lock; it cannot have moved"
            append_event(db, job_id, now, actual, new, attempt)

    def set_aside(self, row: UnreadableRow, why: str) -> bool:
        """Move a job whose row is damaged (`row.corrupt`) to `error` with `why`, the damaged text
        kept in the event: readable again, and resumable from its checkpoint. The one move outside
        `TRANSITIONS`: a record that cannot be read cannot take the state machine's steps. False
        (nothing written) when the row changed since it was read."""
        assert row.corrupt, "only damage is set aside; a newer clusterft's row is left alone"
        new, now = Errored(why), self._clock()
        with self._sql.write() as db:
            current = self._locked_row(db, row.job_id)
            if current is None or current["state"] != row.state:
                return False
            if any(current[column] != text for column, text in row.corrupt.items()):
                return False
            self._check_fence(db, row.job_id, now)
            result = current["result"] if "result" not in row.corrupt else "{}"
            db.execute(
                "UPDATE jobs SET state = ?, state_data = ?, reason = ?, result = ?, updated_at = ?"
                " WHERE id = ?",
                (new.kind, json.dumps(new.data()), why, result, now, row.job_id),
            )
            data = {**new.data(), "unreadable": dict(row.corrupt)}
            append_event(db, row.job_id, now, JobState(row.state), new, current["attempt"], data=data)
        return True

    def upgrade_spec(self, job_id: str) -> Job:
        """Rewrite a job's spec stored under an older spec schema in the current one, and record the
        keys that went away or were set to keep its meaning as a warning in its history (once: the
        job is current afterwards).
        Raises `SpecSchemaError` when the spec is of a newer schema or no longer validates."""
        now = self._clock()
        with self._sql.write() as db:
            row = self._locked_row(db, job_id)
            if row is None:
                raise UnknownJob(job_id)
            old = row["spec_schema"]
            if old != SPEC_SCHEMA_VERSION:
                self._check_fence(db, job_id, now)
                loaded = load_spec(row["spec_yaml"], old)
                db.execute(
                    "UPDATE jobs SET spec_yaml = ?, spec_schema = ? WHERE id = ?",
                    (dump_spec(loaded.spec), SPEC_SCHEMA_VERSION, job_id),
                )
                if loaded.dropped or loaded.kept_meaning:
                    state = state_from_json(row["state"], row["state_data"])
                    changes = []
                    if loaded.dropped:
                        changes.append(f"dropped {', '.join(loaded.dropped)}, which this one no longer has")
                    if loaded.kept_meaning:
                        kept = ", ".join(f"{key}: {json.dumps(v)}" for key, v in loaded.kept_meaning.items())
                        changes.append(f"set {kept}, which is what that clusterft did without it")
                    why = f"spec stored by an older clusterft (spec schema {old}): {'; '.join(changes)}"
                    data = {
                        "warning": "spec_schema",
                        "from_schema": old,
                        "dropped": dict(loaded.dropped),
                        "kept_meaning": dict(loaded.kept_meaning),
                    }
                    append_event(db, job_id, now, state.kind, state, row["attempt"], why, data)
        return self.get(job_id)

    # ------------------------------------------------------------ leases

    def claim(
        self, job_id: str, holder: str, host: str, pid: int, duration_s: float, *, dead: str | None = None
    ) -> Lease:
        """Claim or renew the job's lease for `holder` (a controller's id) until `duration_s` from now,
        in one compare-and-set: it is taken when free, expired, already `holder`'s, or held by `dead`
        (a holder the caller knows is gone). Returns the lease as it now is: `holder`'s when claimed,
        the live holder's otherwise (nothing written)."""
        now = self._clock()
        with self._sql.write() as db:
            db.execute(
                "INSERT INTO leases (job_id, holder, host, pid, heartbeat_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET holder = excluded.holder,"
                " host = excluded.host, pid = excluded.pid, heartbeat_at = excluded.heartbeat_at,"
                " expires_at = excluded.expires_at WHERE leases.holder = excluded.holder"
                " OR leases.expires_at <= excluded.heartbeat_at OR leases.holder = ?",
                (job_id, holder, host, pid, now, now + duration_s, dead),
            )
            row = db.execute("SELECT * FROM leases WHERE job_id = ?", (job_id,)).fetchone()
        return lease_from_row(row)

    def release(self, job_id: str, holder: str) -> None:
        """Give up `holder`'s lease on the job (nothing if another holds it now)."""
        with self._sql.write() as db:
            db.execute("DELETE FROM leases WHERE job_id = ? AND holder = ?", (job_id, holder))

    def lease(self, job_id: str) -> Lease | None:
        """The job's lease as stored (maybe expired); None when none was claimed or it was released."""
        rows = self._sql.read("SELECT * FROM leases WHERE job_id = ?", (job_id,))
        return lease_from_row(rows[0]) if rows else None

    # ------------------------------------------------------------ history and logs

    def events(self, job_id: str) -> list[Event]:
        """Every transition of the job, oldest first."""
        self.get(job_id)
        rows = self._sql.read("SELECT * FROM events WHERE job_id = ? ORDER BY seq", (job_id,))
        return [event_from_row(row) for row in rows]

    def add_log(self, job_id: str, kind: str, path: str | Path, attempt: int | None = None) -> LogPointer:
        """Point at a log file (on shared storage) of one attempt; default: the current attempt.
        Logs stay in files; the store only says where they are."""
        now = self._clock()
        with self._sql.write() as db:
            row = self._locked_row(db, job_id, "attempt")
            if row is None:
                raise UnknownJob(job_id)
            self._check_fence(db, job_id, now)
            attempt = row["attempt"] if attempt is None else attempt
            db.execute(
                "INSERT INTO logs (job_id, attempt, kind, path, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (job_id, attempt, kind) DO UPDATE SET path = excluded.path,"
                " created_at = excluded.created_at",
                (job_id, attempt, kind, str(path), now),
            )
        return LogPointer(job_id, attempt, kind, str(path), now)

    def logs(self, job_id: str) -> list[LogPointer]:
        """The job's log files in the order their phases ran: by attempt, then start time."""
        self.get(job_id)
        rows = self._sql.read(
            "SELECT * FROM logs WHERE job_id = ? ORDER BY attempt, created_at, kind", (job_id,)
        )
        return [log_from_row(row) for row in rows]


def _check_folders_free(db: Transaction, folders: Mapping[str, str], but_job: str | None = None) -> None:
    """`FolderInUse` if an unsettled job (other than `but_job`) holds one of `folders`."""
    if not folders:
        return
    settled = [str(s) for s in SETTLED]
    rows = db.execute(
        f"SELECT id, state, folders FROM jobs WHERE state NOT IN ({', '.join('?' * len(settled))})", settled
    ).fetchall()
    for row in rows:
        if row["id"] == but_job:
            continue
        try:
            held = json.loads(row["folders"])
        except ValueError:
            continue  # a damaged row; the controller sets it aside
        for folder, path in folders.items():
            if isinstance(held, dict) and held.get(folder) == path:
                raise FolderInUse(folder, path, row["id"], row["state"])
