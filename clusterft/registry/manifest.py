"""A registered version's manifest and the file operations that make versions trustworthy.

The manifest lists the sha256 and size of every file of a version; it is written last, through a
temp file, fsync and rename, so its presence means the version is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from clusterft.storage.fs import sha256_file

MANIFEST = "manifest.json"
FORMAT = 1
Kind = Literal["adapter", "merged", "full"]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """What a registered file must still be: its sha256 and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """Everything known about one version: what it is, where it came from, how it scored, and the
    hash of every file. `files` keys are POSIX paths relative to the version directory.

    `merge_check` (kind merged only) is the passing merge-equivalence report of the merged weights,
    with the adapter they came from and its hash; manifests written before it existed have none."""

    name: str
    version: str
    kind: Kind
    files: Mapping[str, FileEntry]
    created_at: str
    base_model: str | None = None
    base_model_sha256: str | None = None
    job_id: str | None = None
    checkpoint: str | None = None
    eval: Mapping[str, Any] = field(default_factory=dict)
    merge_check: Mapping[str, Any] | None = None
    format: int = FORMAT

    def to_json(self) -> str:
        record = asdict(self)
        if record["merge_check"] is None:
            del record["merge_check"]  # adapter and full manifests stay readable by older readers
        return json.dumps(record, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["files"] = {path: FileEntry(**entry) for path, entry in raw["files"].items()}
        return cls(**raw)


def tree_sha256(path: Path) -> str:
    """One hash for a file or a whole directory (e.g. a base model): sha256 over the sorted
    `relative-path sha256` lines of its files, so renames and edits both change it."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [f"{rel} {sha256_file(path / rel)}\n" for rel in files_under(path)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def files_under(root: Path) -> list[str]:
    """Relative POSIX paths of every file below `root` (symlinks followed), sorted."""
    found = []
    for dirpath, _dirs, names in os.walk(root, followlinks=True):
        for name in names:
            found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def copy_hashed(src: Path, dst: Path) -> FileEntry:
    """Copy one file durably, hashing it on the way (one read of a possibly huge file)."""
    digest, size = hashlib.sha256(), 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as reader, open(dst, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return FileEntry(digest.hexdigest(), size)
