"""Checkpoint bundles on shared storage: written under a temporary name, verified by a manifest, published
atomically, pruned to the last K, and found again by `find_latest_valid()`.

    <root>/
      .tmp-step_000000012-3f2a.../   a save in progress (or one that died): never loaded
      step_000000008/                a published bundle
        manifest.json                written last: sha256 + size of every other file, and metadata
        ...                          whatever the trainer wrote (weights, optimizer, rng, data position)

A bundle is valid when its manifest parses and every listed file exists with the listed size and
sha256, and no file is unlisted. Anything else (a kill mid-save, a truncated or 0-byte shard, a
missing manifest) makes it invalid, and `find_latest_valid()` skips it with a warning that names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterft.storage.fs import Storage

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "clusterft-checkpoint/1"
BUNDLE_RE = re.compile(r"^step_(\d{9})$")
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class BundleInfo:
    """One bundle as found on storage; `problem` is None when it verified (or was not checked)."""

    name: str
    step: int
    size_bytes: int
    problem: str | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def valid(self) -> bool:
        return self.problem is None


def bundle_name(step: int) -> str:
    return f"step_{step:09d}"


class BundleStore:
    """The bundles of one run under `root` (a local dir or a pyarrow URI)."""

    def __init__(self, root: str | Path | Storage):
        self.storage = root if isinstance(root, Storage) else Storage(root)

    # ------------------------------------------------------------------ writing

    def begin(self, step: int) -> str:
        """Create and return the temporary directory a save of `step` writes into."""
        tmp = f"{TMP_PREFIX}{bundle_name(step)}-{uuid.uuid4().hex[:8]}"
        self.storage.makedirs(tmp)
        return tmp

    def put_bytes(self, tmp: str, relpath: str, data: bytes) -> None:
        self.storage.write_bytes(f"{tmp}/{relpath}", data)

    def put_file(self, tmp: str, relpath: str, local_file: Path) -> None:
        self.storage.upload(local_file, f"{tmp}/{relpath}")

    def publish(self, tmp: str, step: int, meta: dict[str, Any]) -> BundleInfo:
        """Checksum what `tmp` holds, write the manifest last, and rename it to its final name.

        The sums are computed by reading the files back from storage, so the manifest vouches for
        what is stored, not for what a writer meant to store.
        """
        files = {
            rel: {"bytes": size, "sha256": self._sha256(f"{tmp}/{rel}")} for rel, size in self._files(tmp)
        }
        manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files, "meta": meta}
        self.storage.write_bytes(f"{tmp}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
        final = bundle_name(step)
        if self.storage.exists(final):
            # An invalid bundle of the same step, from a run that died and restarted earlier.
            logger.warning("replacing checkpoint %s (it is being rewritten after a restart)", final)
            self.storage.delete_dir(final)
        self.storage.rename(tmp, final)
        return BundleInfo(final, step, sum(f["bytes"] for f in files.values()), None, meta)

    # ------------------------------------------------------------------ reading

    def list(self, verify: bool = True) -> list[BundleInfo]:
        """Every published bundle, oldest first; with `verify`, each one's sums are checked."""
        infos = []
        for name in self.storage.listdir():
            match = BUNDLE_RE.match(name)
            if match:
                infos.append(self.inspect(name, int(match.group(1)), verify))
        return infos

    def inspect(self, name: str, step: int | None = None, verify: bool = True) -> BundleInfo:
        """Check one bundle: its manifest, and (with `verify`) every file's size and sha256."""
        if step is None:
            match = BUNDLE_RE.match(name)
            step = int(match.group(1)) if match else -1
        files = dict(self._files(name))
        size = sum(files.values())
        try:
            manifest = json.loads(self.storage.read_bytes(f"{name}/{MANIFEST}"))
        except FileNotFoundError:
            return BundleInfo(name, step, size, "no manifest (the save did not finish)")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return BundleInfo(name, step, size, "manifest is not valid JSON")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return BundleInfo(name, step, size, f"manifest format is not {FORMAT}")
        meta = manifest.get("meta", {})
        listed: dict[str, dict[str, Any]] = manifest.get("files", {})
        files.pop(MANIFEST, None)
        problem = _compare_sizes(listed, files)
        if problem is None and verify:
            for rel, entry in listed.items():
                if self._sha256(f"{name}/{rel}") != entry["sha256"]:
                    problem = f"{rel}: sha256 mismatch"
                    break
        return BundleInfo(name, step, size, problem, meta)

    def find_latest_valid(self) -> BundleInfo | None:
        """The newest bundle whose manifest verifies; newer invalid ones are skipped with a warning."""
        for info in reversed(self.list(verify=False)):
            checked = self.inspect(info.name, info.step, verify=True) if info.valid else info
            if checked.valid:
                return checked
            logger.warning("skipping checkpoint %s: %s", self.storage.full(checked.name), checked.problem)
        return None

    def read_bytes(self, bundle: str, relpath: str) -> bytes:
        return self.storage.read_bytes(f"{bundle}/{relpath}")

    def files(self, bundle: str) -> list[str]:
        return [rel for rel, _ in self._files(bundle) if rel != MANIFEST]

    # ------------------------------------------------------------------ pruning

    def prune(self, keep_last: int) -> list[str]:
        """Delete all but the newest `keep_last` valid bundles; return the names deleted.

        Invalid bundles and abandoned temporary dirs older than the newest valid bundle go too; the
        newest valid bundle is never deleted, whatever `keep_last` says.
        """
        keep_last = max(keep_last, 1)
        infos = self.list(verify=False)
        valid = [info for info in infos if info.valid]
        if not valid:
            return []
        newest = valid[-1].step
        kept = {info.name for info in valid[-keep_last:]}
        doomed = [info.name for info in infos if info.name not in kept and info.step < newest]
        doomed += [
            name
            for name in self.storage.listdir()
            if name.startswith(TMP_PREFIX) and _tmp_step(name) is not None and _tmp_step(name) < newest
        ]
        for name in doomed:
            self.storage.delete_dir(name)
        return doomed

    # ------------------------------------------------------------------ helpers

    def _files(self, path: str) -> list[tuple[str, int]]:
        return list(self.storage.walk_files(path))

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        for chunk in self.storage.iter_chunks(path):
            digest.update(chunk)
        return digest.hexdigest()


def _compare_sizes(listed: dict[str, dict[str, Any]], present: dict[str, int]) -> str | None:
    for rel, entry in listed.items():
        if rel not in present:
            return f"{rel}: missing"
        if present[rel] != entry["bytes"]:
            return f"{rel}: {present[rel]} bytes, manifest says {entry['bytes']} (truncated?)"
    extra = sorted(set(present) - set(listed))
    return f"{extra[0]}: not in the manifest" if extra else None


def _tmp_step(name: str) -> int | None:
    match = re.match(rf"^{re.escape(TMP_PREFIX)}step_(\d{{9}})-", name)
    return int(match.group(1)) if match else None
