"""The job store on SQLite: one file, the embedded default for one host.

Writes take SQLite's write lock at BEGIN (`BEGIN IMMEDIATE`) and wait up to `busy_timeout_s` for it,
so every write is exclusive; one that fails, its COMMIT included, is rolled back whole.

The journal mode follows the filesystem the file is on (`choose_journal_mode`). WAL lets readers
(`jobs list`, the REST API) run while the controller writes, but it shares memory between processes
through a -shm file, which only works on one host: on a network filesystem (NFS, SMB, CephFS, Lustre,
FUSE mounts such as s3fs or gcsfuse) a WAL store can be corrupted, so there the store keeps a
rollback journal (`delete`), which POSIX locks make safe on NFSv4 for processes of one host, and
asking for WAL is refused. Writers on several hosts need a server: a PostgreSQL store.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from clusterft.controller.store_backend import STORE_URL_ENV, Row
from clusterft.controller.store_schema import migrate
from clusterft.errors import UserError

logger = logging.getLogger(__name__)
JournalMode = Literal["wal", "delete"]

NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs", "afs", "9p", "fuse"}
)
"""Filesystem types (as /proc/mounts names them) whose files other hosts may open; also every
`smb*` and `fuse.*` type (fuse.s3fs, fuse.gcsfuse, fuse.sshfs, ...)."""


def is_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith(("smb", "fuse."))


def mount_type(path: PurePosixPath, mounts: str) -> str | None:
    """The type of the filesystem holding `path` (absolute, symlinks resolved), given the text of
    /proc/mounts: that of the longest mount point above it, the last one mounted there if several
    were. None when no line names a mount point above it."""
    found, longest = None, -1
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts writes a space, tab, newline or backslash in a path as an octal escape.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
        if path.is_relative_to(point) and len(point) >= longest:
            found, longest = fields[2], len(point)
    return found


def filesystem_type(directory: Path) -> str | None:
    """The filesystem type of `directory` on this host; None where /proc/mounts cannot be read."""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return mount_type(PurePosixPath(directory.resolve()), mounts)


def choose_journal_mode(fstype: str | None, requested: JournalMode | None, where: str) -> JournalMode:
    """`requested`, else WAL on a local filesystem and a rollback journal (`delete`) on a network
    one; a UserError for WAL asked for on a network filesystem."""
    network = fstype is not None and is_network_filesystem(fstype)
    if requested == "wal" and network:
        raise UserError(
            f"job store {where}: journal_mode wal on a {fstype} filesystem can corrupt the store (WAL shares "
            "memory through a -shm file, which works only between processes of one host); leave "
            "journal_mode unset (a rollback journal there), or, for controllers and commands on several "
            f"hosts, use a PostgreSQL store (--store-url / ${STORE_URL_ENV})"
        )
    return requested or ("delete" if network else "wal")


class SqliteBackend:
    """One connection behind a lock: safe to share between threads, and between processes through
    SQLite's file locks."""

    row_lock = ""

    def __init__(self, path: Path, *, busy_timeout_s: float, journal_mode: JournalMode | None):
        self.path = path
        self.location = self.where = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fstype = filesystem_type(path.parent)
        self.journal_mode = choose_journal_mode(fstype, journal_mode, self.where)
        if journal_mode is None and self.journal_mode == "delete":
            logger.warning(
                "job store %s is on a %s filesystem: SQLite with a rollback journal (WAL is unsafe there); "
                "it serves the processes of one host: for several, use a PostgreSQL store (%s)",
                path,
                fstype,
                STORE_URL_ENV,
            )
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each transaction is explicit.
        self._db = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = self._db.execute(f"PRAGMA journal_mode = {self.journal_mode}").fetchone()[0]
        if mode != self.journal_mode:
            self._db.close()
            raise UserError(
                f"job store {path} stays in journal mode {mode}, not {self.journal_mode}: another process "
                "has it open in that mode; stop it (the controller, `jobs api`) and open the store again"
            )
        self._db.execute("PRAGMA foreign_keys = ON")
        # In WAL mode NORMAL is durable across process crashes; only a power cut may lose the tail.
        self._db.execute(f"PRAGMA synchronous = {'NORMAL' if self.journal_mode == 'wal' else 'FULL'}")
        with self.write() as db:
            migrate(db, self.where)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def write(self, *, exclusive: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its start (no upgrade deadlocks):
        every write is exclusive."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (busy, I/O error) leaves the transaction open: its changes would
                # read as written, and every later BEGIN would fail. SQLite may have ended it already.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def schema_version(self) -> int:
        return self.read("PRAGMA user_version")[0][0]
