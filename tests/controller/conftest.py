"""Shared helpers for the controller tests: a minimal job spec, a job record, and where a job store
goes on each backend (a SQLite file, a database on a real PostgreSQL server)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from clusterft.config import JobSpec, parse_job_dict
from clusterft.controller.state import Job, State, Submitted


def make_spec(**sections: dict[str, Any]) -> JobSpec:
    """A valid spec (LLaMA-Factory flat keys) with clusterft sections given as keyword mappings."""
    raw: dict[str, Any] = {
        "model_name_or_path": "models/tiny-llama",
        "dataset": "demo_tasks",
        "output_dir": "saves/demo",
        "max_steps": 10,
        **sections,
    }
    return parse_job_dict(raw, "test.yaml")


def make_job(state: State | None = None, *, attempt: int = 1, restarts: int = 0) -> Job:
    return Job(
        id="job-20261128-091500-ab12",
        name="demo",
        spec_yaml="",
        spec_hash="0" * 64,
        state=state or Submitted(),
        attempt=attempt,
        restarts=restarts,
        created_at=0.0,
        updated_at=0.0,
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from clusterft.hf.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", "tiny")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL server for the session: pgserver runs the binaries its wheel ships on a Unix
    socket (no root, no network), started once (about a second) and stopped, its data deleted, at
    the end."""
    import pgserver
    import psycopg

    server = pgserver.get_server(tmp_path_factory.mktemp("postgres") / "data", cleanup_mode="delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        # A server whose data is deleted at the end: no fsync (its shutdown checkpoint takes
        # milliseconds rather than seconds). Locks and transactions are what they are with it.
        admin.execute("ALTER SYSTEM SET fsync = off")
        admin.execute("SELECT pg_reload_conf()")
    yield server
    server.cleanup()


def new_postgres_store(server) -> str:
    """The URL of a new, empty store on `server`: a schema of its own, named in the URL's search_path
    as a deployment sharing one database with other applications would (a new database per test
    is a copy of template1: a hundred times slower)."""
    import psycopg

    schema = f"store_{secrets.token_hex(6)}"
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    return f"{server.get_uri()}&options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path) -> str:
    """Where a new job store goes, once per backend: a file on the test's disk, or a new schema on
    the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "shared" / "jobs.db")
    return new_postgres_store(request.getfixturevalue("postgres_server"))
