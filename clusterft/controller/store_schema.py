"""The job store's schema on each database: the migrations that build it, applied in order, and the
database's version (SQLite: `PRAGMA user_version`; PostgreSQL: the `clusterft_schema` table). A
database of a newer clusterft is refused, not downgraded.

The two schemas hold the same tables, columns and rules: timestamps are 8-byte floats (PostgreSQL's
REAL is 4 bytes), ids and log kinds sort bytewise as in SQLite (`COLLATE "C"`), JSON stays TEXT so a
damaged value reads as damage rather than failing the write, and the event history refuses UPDATE
and DELETE (triggers). A change to one schema is a new migration on both, bringing both to the same
SCHEMA_VERSION.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from clusterft.errors import UserError

if TYPE_CHECKING:
    import psycopg

SCHEMA_VERSION = 4
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
    # 4: which controller acts on a job (store.py's leases); a job without a row is free.
    """
    CREATE TABLE leases (
        job_id TEXT PRIMARY KEY REFERENCES jobs(id),
        holder TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        heartbeat_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION

# (the version it brings a database to, its script), in order; PostgreSQL stores start at version 3,
# the first they had. Never edit a released entry, append.
POSTGRES_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        3,
        """
        CREATE TABLE jobs (
            id TEXT COLLATE "C" PRIMARY KEY,
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
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            spec_schema INTEGER NOT NULL DEFAULT 0,
            idempotency_key TEXT,
            folders TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX jobs_by_state ON jobs(state);
        CREATE UNIQUE INDEX jobs_by_idempotency_key ON jobs(idempotency_key);
        CREATE TABLE events (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs(id),
            at DOUBLE PRECISION NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            reason TEXT,
            data TEXT NOT NULL
        );
        CREATE INDEX events_by_job ON events(job_id, seq);
        CREATE FUNCTION clusterft_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'events are append-only'; END $$;
        CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
            FOR EACH ROW EXECUTE FUNCTION clusterft_events_append_only();
        CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
            FOR EACH STATEMENT EXECUTE FUNCTION clusterft_events_append_only();
        CREATE TABLE logs (
            job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            kind TEXT COLLATE "C" NOT NULL,
            path TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (job_id, attempt, kind)
        );
        """,
    ),
    (
        4,
        """
        CREATE TABLE leases (
            job_id TEXT COLLATE "C" PRIMARY KEY REFERENCES jobs(id),
            holder TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        """,
    ),
)
assert POSTGRES_MIGRATIONS[-1][0] == SCHEMA_VERSION


def check_not_newer(version: int, where: str) -> None:
    """A UserError if the store at `where` has a newer schema than this clusterft's."""
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{where} has job-store schema {version}, newer than this clusterft's "
            f"({SCHEMA_VERSION}); upgrade clusterft to open it"
        )


def migrate(db: sqlite3.Connection, where: str) -> None:
    """Bring the SQLite database (`where`, for the message) to SCHEMA_VERSION, inside the caller's
    write transaction; a UserError if it is of a newer schema than this clusterft's."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    check_not_newer(version, where)
    for upgrade in MIGRATIONS[version:]:
        for statement in statements(upgrade):
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def migrate_postgres(db: psycopg.Connection[Any], where: str) -> None:
    """`migrate` for PostgreSQL, inside the caller's transaction (which holds the store's exclusive
    lock, so two processes opening a new database create its tables once)."""
    if db.execute("SELECT to_regclass('clusterft_schema') IS NULL AS absent").fetchone()["absent"]:
        db.execute("CREATE TABLE clusterft_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO clusterft_schema VALUES (0)")
    version = db.execute("SELECT version FROM clusterft_schema").fetchone()["version"]
    check_not_newer(version, where)
    for target, script in POSTGRES_MIGRATIONS:
        if target > version:
            db.execute(script)  # no parameters: one call may hold several statements
    db.execute("UPDATE clusterft_schema SET version = %s", (SCHEMA_VERSION,))


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
