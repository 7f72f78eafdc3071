"""The store's rows as clusterft's objects, and back: a job (or what makes its row unreadable), an
event of its history, a pointer to a log file, a controller's lease on a job."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clusterft.controller.state import Job, JobState, State, state_from_json
from clusterft.controller.store_backend import Row, Transaction


@dataclass(frozen=True)
class Event:
    """One row of a job's history; `from_state` is None for the submission. A warning about the job
    that moves nothing (e.g. spec keys dropped on upgrade) has `from_state == to_state` and
    `data["warning"]`."""

    seq: int
    job_id: str
    at: float
    from_state: JobState | None
    to_state: JobState
    attempt: int
    reason: str | None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UnreadableRow:
    """A row of the jobs table this clusterft cannot read as a `Job`."""

    job_id: str
    state: str
    """The state column as stored (maybe a state a newer clusterft has)."""
    attempt: int
    error: str
    corrupt: Mapping[str, str] = field(default_factory=dict)
    """Column → stored text, for each JSON column that does not parse as an object: damage (a torn
    write, an edit by hand). Empty for a row a newer clusterft wrote (an unknown state or field)."""


@dataclass(frozen=True)
class LogPointer:
    job_id: str
    attempt: int
    kind: str
    """Whose log: "driver", "worker-0", "eval", ..."""
    path: str
    created_at: float


@dataclass(frozen=True)
class Lease:
    """A controller's claim on a job: only `holder` acts on it until `expires_at` (store time), unless
    it renews. `host` and `pid` are the holder's process, for messages and for noticing a dead one."""

    job_id: str
    holder: str
    host: str
    pid: int
    heartbeat_at: float
    expires_at: float


def lease_from_row(row: Row) -> Lease:
    return Lease(
        row["job_id"], row["holder"], row["host"], row["pid"], row["heartbeat_at"], row["expires_at"]
    )


def read_row(row: Row) -> Job | UnreadableRow:
    """The row as a Job, or as what is wrong with it."""
    corrupt = {}
    for column in ("state_data", "result"):
        try:
            ok = isinstance(json.loads(row[column]), dict)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            corrupt[column] = row[column]
    if corrupt:
        error = f"{' and '.join(corrupt)} {'is' if len(corrupt) == 1 else 'are'} not a JSON object"
        return UnreadableRow(row["id"], row["state"], row["attempt"], error, corrupt)
    try:
        return job_from_row(row)
    except (ValueError, TypeError, KeyError) as err:
        return UnreadableRow(row["id"], row["state"], row["attempt"], f"{type(err).__name__}: {err}")


def job_from_row(row: Row) -> Job:
    return Job(
        id=row["id"],
        name=row["name"],
        spec_yaml=row["spec_yaml"],
        spec_hash=row["spec_hash"],
        state=state_from_json(row["state"], row["state_data"]),
        attempt=row["attempt"],
        restarts=row["restarts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        result=json.loads(row["result"]),
        resumed_from=row["resumed_from"],
        spec_schema=row["spec_schema"],
    )


def event_from_row(row: Row) -> Event:
    return Event(
        seq=row["seq"],
        job_id=row["job_id"],
        at=row["at"],
        from_state=JobState(row["from_state"]) if row["from_state"] else None,
        to_state=JobState(row["to_state"]),
        attempt=row["attempt"],
        reason=row["reason"],
        data=json.loads(row["data"]),
    )


def log_from_row(row: Row) -> LogPointer:
    return LogPointer(row["job_id"], row["attempt"], row["kind"], row["path"], row["created_at"])


def append_event(
    db: Transaction,
    job_id: str,
    now: float,
    src: JobState | None,
    new: State,
    attempt: int,
    reason: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> None:
    """One history row: a transition to `new` (its reason and data by default), or a warning."""
    db.execute(
        "INSERT INTO events (job_id, at, from_state, to_state, attempt, reason, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            job_id,
            now,
            src,
            new.kind,
            attempt,
            reason if reason is not None else new.reason,
            json.dumps(dict(data) if data is not None else new.data()),
        ),
    )
