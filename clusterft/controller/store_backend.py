"""The seam between the job store and its database: what a backend gives the store (`Backend`, and
the `Transaction` its writes run in), and where a store is (a path or a URL); `store.open_backend`
picks the backend by the location.

    a directory's jobs.db, or any path   SQLite (store_sqlite.py): the embedded default, one host
    postgresql://user@host:5432/db        PostgreSQL (store_postgres.py): a store for a cluster

The store writes its SQL once, with `?` placeholders and the syntax both databases share (upserts
are `INSERT ... ON CONFLICT ... DO UPDATE`); a backend runs it. Rows read by column name
(`row["state"]`) on both. Locking is the backend's: `write(exclusive=True)` for a write that checks
other jobs (a submission's idempotency key and folders, a resume's folders), `row_lock` appended to
the SELECT of the one job a write moves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

STORE_FILE = "jobs.db"
STORE_URL_ENV = "CLUSTERFT_STORE_URL"
POSTGRES_SCHEMES = ("postgresql", "postgres")

Row = Mapping[str, Any]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Transaction(Protocol):
    """One open transaction: statements with `?` placeholders, rows by column name."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...


class Backend(Protocol):
    location: str
    """What the store was opened with: a file path or a URL (its password included)."""
    where: str
    """The store for messages and logs: the path, or the URL without its password."""
    path: Path | None
    """The SQLite file; None for a server."""
    row_lock: str
    """What makes a SELECT of one job lock its row until the transaction ends ("" in SQLite, whose
    writes lock the whole database from their start)."""

    def write(self, *, exclusive: bool = False) -> AbstractContextManager[Transaction]:
        """A write transaction, committed when the block ends, rolled back whole if it raises.
        `exclusive`: no other exclusive write runs meanwhile."""
        ...

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def schema_version(self) -> int: ...

    def close(self) -> None: ...


def is_store_url(location: str | Path) -> bool:
    return "://" in str(location)


def store_location(root: str | Path, store_url: str | None = None) -> str | Path:
    """The job store of a controller root: `store_url` when given, else SQLite in `root/jobs.db`."""
    return store_url or Path(root) / STORE_FILE


def describe(location: str | Path) -> str:
    """The store as messages name it: a path as given, a URL without its password."""
    if not is_store_url(location):
        return str(location)
    parts = urlsplit(str(location))
    userinfo, at, host = parts.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return parts._replace(netloc=userinfo + at + host, query=query).geturl()
