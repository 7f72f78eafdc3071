"""The job store on PostgreSQL: a server that the controller, `jobs api` and every `clusterft jobs`
command reach from any host (`--store-url` / `$CLUSTERFT_STORE_URL`, a libpq URL:
`postgresql://user@host:5432/db`; the password from `~/.pgpass` or `$PGPASSWORD` keeps it off command
lines).

The store's compare-and-set is the same as on SQLite, with row locks in place of SQLite's lock on the
whole file: a write `SELECT ... FOR UPDATE`s the job it moves (READ COMMITTED: once the lock is held
the row read is the newest committed one), so two writers of one job take turns and the second finds
the state the first wrote; writers of different jobs run side by side. An exclusive write (a
submission, a resume: each checks every unsettled job's folders) first takes a transaction-scoped
advisory lock, so two of them take turns too. Lock waits give up after `busy_timeout_s`
(`lock_timeout`), as SQLite's busy timeout does. A connection the server dropped (a restart, a
failover) is opened again by the next call; a write it broke midway raises (rolled back, or committed
if its COMMIT reached the server first: a retry of the move finds the job moved, `StaleState`).

psycopg is imported only here, when a postgresql:// store is opened.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from clusterft.controller.store_backend import STORE_URL_ENV, Cursor, Row, describe
from clusterft.controller.store_schema import migrate_postgres
from clusterft.errors import UserError

EXCLUSIVE_WRITES = 0x636C7573746572  # the advisory lock key of exclusive writes ("cluster" in ASCII)
CONNECT_TIMEOUT_S = 10


@functools.lru_cache(maxsize=256)
def postgres_sql(sql: str) -> str:
    """The store's SQL with psycopg's placeholders: `?` -> `%s` (and a literal `%` -> `%%`). The store's
    statements hold no `?` or `%` inside a string literal."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Transaction:
    def __init__(self, db: Any):
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._db.execute(postgres_sql(sql), tuple(params))


class PostgresBackend:
    """One connection behind a lock (reopened when the server dropped it), in autocommit: each
    read is its own transaction, each write one `transaction()` block."""

    row_lock = " FOR UPDATE"
    path = None

    def __init__(self, url: str, *, busy_timeout_s: float):
        self.location, self.where = url, describe(url)
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._db = self._connect()
        with self.write(exclusive=True):
            migrate_postgres(self._db, self.where)

    def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        try:
            db = psycopg.connect(
                self.location, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S
            )
        except psycopg.OperationalError as err:
            raise UserError(
                f"job store {self.where}: cannot connect ({str(err).strip()}); check the URL "
                f"(--store-url / ${STORE_URL_ENV}), that the server runs and that this host may reach it"
            ) from None
        db.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(self._busy_timeout_s * 1000)}ms",))
        return db

    def _connection(self) -> Any:
        if self._db.closed or self._db.broken:
            self._db.close()
            self._db = self._connect()
        return self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def write(self, *, exclusive: bool = False) -> Iterator[_Transaction]:
        with self._lock, ExitStack() as transaction:
            db = self._begin(transaction)
            if exclusive:
                db.execute("SELECT pg_advisory_xact_lock(%s)", (EXCLUSIVE_WRITES,))
            yield _Transaction(db)

    def _begin(self, transaction: ExitStack) -> Any:
        """BEGIN on the connection; on a new one if the server dropped it since the last call (only
        BEGIN was sent: safe to send again)."""
        import psycopg

        db = self._connection()
        try:
            transaction.enter_context(db.transaction())
        except psycopg.OperationalError:
            if not db.broken:
                raise
            db = self._connection()
            transaction.enter_context(db.transaction())
        return db

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        import psycopg

        with self._lock:
            try:
                return self._connection().execute(postgres_sql(sql), tuple(params)).fetchall()
            except psycopg.OperationalError:
                if not self._db.broken:
                    raise
                # The server dropped the connection since the last call; a read is safe to repeat.
                return self._connection().execute(postgres_sql(sql), tuple(params)).fetchall()

    def schema_version(self) -> int:
        return self.read("SELECT version FROM clusterft_schema")[0]["version"]
