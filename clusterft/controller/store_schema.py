"""The job store's SQLite schema: the migrations that build it, applied in order, the database's
version kept in `PRAGMA user_version`. A database of a newer clusterft is refused, not downgraded.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from clusterft.errors import UserError

SCHEMA_VERSION = 3
# Index i upgrades a database from schema version i to i + 1; never edit a released entry, append.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        spec_yaml TEXT NOT NULL,
        spec_hash TEXT NOT NULL,
        state TEXT NOT NULL,
        state_data TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        restarts INTEGER NOT NULL,
        reason TEXT,
        result TEXT NOT NULL,
        resumed_from TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_by_state ON jobs(state);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs(id),
        at REAL NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        reason TEXT,
        data TEXT NOT NULL
    );
    CREATE INDEX events_by_job ON events(job_id, seq);
    -- The history is evidence (what happened, when, why): it is never rewritten.
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TABLE logs (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        attempt INTEGER NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (job_id, attempt, kind)
    );
    """,
    # 2: the spec schema each job's spec_yaml was written under; rows from before it are 0.
    """
    ALTER TABLE jobs ADD COLUMN spec_schema INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: the submission's idempotency key, and the folders its run writes ({"train.output_dir": path}).
    """
    ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
    CREATE UNIQUE INDEX jobs_by_idempotency_key ON jobs(idempotency_key);
    ALTER TABLE jobs ADD COLUMN folders TEXT NOT NULL DEFAULT '{}';
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the database (`path`, for the message) to SCHEMA_VERSION, inside the caller's write
    transaction; a UserError if it is of a newer schema than this clusterft's."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{path} has job-store schema {version}, newer than this clusterft's "
            f"({SCHEMA_VERSION}); upgrade clusterft to open it"
        )
    for upgrade in MIGRATIONS[version:]:
        for statement in statements(upgrade):
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would COMMIT our transaction)."""
    found, pending = [], ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    assert not pending.strip(), f"incomplete SQL in migration: {pending!r}"
    return found
