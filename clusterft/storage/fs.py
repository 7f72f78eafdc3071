"""Shared storage: a local directory (standing in for NFS) or any URI pyarrow's filesystems accept.

Only the few operations checkpoint bundles need. On a local filesystem writes are fsynced and
renames are atomic (POSIX `rename`). Object stores (S3, GCS through pyarrow) have no directory rename
at all, so nothing there is renamed: a bundle is written in place and committed by its manifest,
written last (see checkpoint.py).
"""

from __future__ import annotations

import copy
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

CHUNK = 1 << 20


class Storage:
    """Files under one root; every path argument is relative to it ("a/b.pt").

    `root` is a local path, a `file://` URI, or any URI pyarrow's filesystems accept; or, with
    `filesystem`, a path inside that pyarrow filesystem (which is then treated as remote).
    """

    def __init__(self, root: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None):
        root = str(root)
        self.local_root: Path | None = None
        if filesystem is not None:
            self.fs, self.root = filesystem, root.rstrip("/")
        elif "://" in root and not root.startswith("file://"):
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.local_root = Path(root.removeprefix("file://")).resolve()
            self.fs, self.root = pafs.LocalFileSystem(), str(self.local_root)
        self.uri = root

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def full(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def local_path(self, path: str = "") -> Path | None:
        """The local filesystem path of `path`, or None when the storage is remote."""
        return self.local_root / path if self.local_root is not None else None

    @property
    def renames_atomically(self) -> bool:
        """Whether a directory can be renamed atomically (a local filesystem; not an object store)."""
        return self.local_root is not None

    def child(self, name: str) -> Storage:
        """The storage rooted at `name` under this one, on the same filesystem."""
        sub = copy.copy(self)
        sub.root, sub.uri = self.full(name), f"{self.uri.rstrip('/')}/{name}"
        sub.local_root = self.local_path(name)
        return sub

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(self.full(path), recursive=True)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(self.full(path)).type != pafs.FileType.NotFound

    def is_dir(self, path: str) -> bool:
        return self.fs.get_file_info(self.full(path)).type == pafs.FileType.Directory

    def listdir(self, path: str = "") -> list[str]:
        """Names directly under `path` (empty if it does not exist)."""
        if not self.is_dir(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.full(path), allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def walk_files(self, path: str) -> Iterator[tuple[str, int, int | None]]:
        """(path relative to `path`, size, mtime in ns if the filesystem keeps one) of every file below
        `path`, sorted by path."""
        base = self.full(path).rstrip("/") + "/"
        infos = self.fs.get_file_info(
            pafs.FileSelector(self.full(path), recursive=True, allow_not_found=True)
        )
        for info in sorted(infos, key=lambda i: i.path):
            if info.type == pafs.FileType.File:
                yield info.path.removeprefix(base), info.size, info.mtime_ns

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(self.full(path)) as stream:
            return stream.read()

    def iter_chunks(self, path: str) -> Iterator[bytes]:
        with self.fs.open_input_stream(self.full(path)) as stream:
            while chunk := stream.read(CHUNK):
                yield chunk

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a file durably: on local disk it is fsynced before this returns."""
        local = self.local_path(path)
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return
        self._make_parent(path)
        with self.fs.open_output_stream(self.full(path)) as stream:
            stream.write(data)

    def upload(self, local_file: Path, path: str) -> None:
        """Copy a local file into storage (durably)."""
        local = self.local_path(path)
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local_file, local)
            fsync_file(local)
            return
        self._make_parent(path)
        with open(local_file, "rb") as src, self.fs.open_output_stream(self.full(path)) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)

    def _make_parent(self, path: str) -> None:
        parent = self.full(path).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)

    def download(self, path: str, local_file: Path) -> None:
        local_file.parent.mkdir(parents=True, exist_ok=True)
        with open(local_file, "wb") as dst:
            for chunk in self.iter_chunks(path):
                dst.write(chunk)

    def rename(self, src: str, dst: str) -> None:
        """Move `src` to `dst` atomically, then fsync the parent dir. Local filesystems only: object
        stores cannot rename a directory (a copy there would be visible half-done)."""
        parent = self.local_path(dst)
        assert parent is not None, f"{self}: no atomic rename on a remote filesystem"
        self.fs.move(self.full(src), self.full(dst))
        fsync_dir(parent.parent)

    def delete_file(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(self.full(path))

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(self.full(path))


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory, fsync, rename over `path`, fsync the directory:
    a reader sees the old content or the new, and a crash leaves one of them."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path, chunk_bytes: int = 4 << 20) -> str:
    """The file's sha256, read in chunks: hashing must not pull a large file into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
