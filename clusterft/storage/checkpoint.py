"""Checkpoint bundles on shared storage: written out of sight, verified by a manifest written last,
pruned to the last K, and found again by `find_latest_valid()`.

    <root>/                            one run's bundles (a "bundles" dir)
      .tmp-step_000000012-3f2a.../     a save in progress on a local filesystem (or one that died)
      step_000000008/                  a published bundle
        manifest.json                  written last: sha256 + size of every other file, and metadata
        ...                            whatever the trainer wrote (weights, optimizer, rng, data position)
      run-1f3a9c2e/                    a later run that started here weights-only: its own bundles
        step_000000002/

Publishing: on a local filesystem a save is written under a temporary name and renamed into place
(atomic). Object stores cannot rename a directory, so there a save is written in place and its
manifest, written last, is the commit: until it exists the bundle reads as "no manifest" and is
never loaded or pruned in favour of an older one.

A bundle is valid when its manifest parses and every listed file exists with the listed size and
sha256, and no file is unlisted. Anything else (a kill mid-save, a truncated or bit-flipped shard, a
missing manifest) makes it invalid, and `find_latest_valid()` skips it with a warning that names it.
A store remembers which bundles it verified (and the size and mtime of their files then), so pruning
after every save hashes each bundle once, not on every save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterft.storage.fs import Storage, fsync_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "clusterft-checkpoint/1"
BUNDLE_RE = re.compile(r"^step_(\d{9})$")
RUN_RE = re.compile(r"^run-[0-9a-f]{8}$")
TMP_PREFIX = ".tmp-"

Listing = list[tuple[str, int, int | None]]  # (path in the bundle, size, mtime_ns)


@dataclass(frozen=True)
class BundleInfo:
    """One bundle as found on storage; `problem` is None when it verified (or was not checked)."""

    name: str
    step: int
    size_bytes: int
    problem: str | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    created: float = field(default=0.0, compare=False)  # when it was published (manifest's clock)

    @property
    def valid(self) -> bool:
        return self.problem is None


def bundle_name(step: int) -> str:
    return f"step_{step:09d}"


class BundleStore:
    """The bundles of one run under `root` (a local dir, a pyarrow URI, or a Storage)."""

    def __init__(self, root: str | Path | Storage):
        self.storage = root if isinstance(root, Storage) else Storage(root)
        # Bundles whose sums this store checked or wrote, with the listing they had then.
        self._verified: dict[str, Listing] = {}

    # ------------------------------------------------------------------ writing

    def begin(self, step: int) -> str:
        """Create and return the directory a save of `step` writes into (relative to the root)."""
        if self.storage.renames_atomically:
            tmp = f"{TMP_PREFIX}{bundle_name(step)}-{uuid.uuid4().hex[:8]}"
            self.storage.makedirs(tmp)
            return tmp
        # In place: without a manifest it is a save in progress to every reader.
        name = bundle_name(step)
        if self.storage.exists(name):
            self._replacing(name)
        self.storage.makedirs(name)
        return name

    def put_bytes(self, tmp: str, relpath: str, data: bytes) -> None:
        self.storage.write_bytes(f"{tmp}/{relpath}", data)

    def put_file(self, tmp: str, relpath: str, local_file: Path) -> None:
        self.storage.upload(local_file, f"{tmp}/{relpath}")

    def put_written(self, tmp: str, relpath: str, write: Callable[[Path], None]) -> None:
        """Store the file `write(path)` makes: written in place (and fsynced) on a local filesystem,
        so a large shard is never held in memory as bytes; staged in a local temp file elsewhere."""
        local = self.storage.local_path(f"{tmp}/{relpath}")
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            write(local)
            fsync_file(local)
            return
        with tempfile.TemporaryDirectory(prefix="cft-stage") as staging:
            staged = Path(staging) / "file"
            write(staged)
            self.put_file(tmp, relpath, staged)

    def file_sum(self, tmp: str, relpath: str) -> dict[str, Any]:
        """Size and sha256 of a stored file, read back from storage (what a manifest entry holds)."""
        size, sha256 = self._digest(f"{tmp}/{relpath}")
        return {"bytes": size, "sha256": sha256}

    def publish(
        self, tmp: str, step: int, meta: dict[str, Any], sums: dict[str, dict[str, Any]] | None = None
    ) -> BundleInfo:
        """Checksum what `tmp` holds and write the manifest last: renamed into place on a local
        filesystem, committed in place (the manifest's write) on an object store.

        The sums are computed by reading the files back from storage, so the manifest vouches for
        what is stored, not for what a writer meant to store. `sums` are such sums computed already
        by the writers (each rank reads back its own files): then nothing is hashed again here, but
        the files present must be exactly those, with those sizes.
        """
        final = bundle_name(step)
        present = {rel: size for rel, size, _ in self._files(tmp)}
        if sums is None:
            files = {
                rel: {"bytes": size, "sha256": self._sha256(f"{tmp}/{rel}")} for rel, size in present.items()
            }
        else:
            problem = _compare_sizes(sums, present)
            if problem is not None:
                raise RuntimeError(f"{self.storage.full(tmp)} is not what its writers wrote: {problem}")
            files = dict(sums)
        manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files, "meta": meta}
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if self.storage.renames_atomically:
            self.storage.write_bytes(f"{tmp}/{MANIFEST}", data)
            if self.storage.exists(final):
                self._replacing(final)
            self.storage.rename(tmp, final)
        else:
            assert tmp == final, f"{tmp}: an object-store save is written in place, as {final}"
            self.storage.write_bytes(f"{final}/{MANIFEST}", data)
        self._verified[final] = self._files(final)
        size = sum(f["bytes"] for f in files.values())
        return BundleInfo(final, step, size, None, meta, manifest["created"])

    def _replacing(self, name: str) -> None:
        # An invalid bundle of the same step, from a save that died before a restart (a valid one
        # would have been resumed from, and the run would not save this step again).
        logger.warning("replacing checkpoint %s (it is being rewritten after a restart)", name)
        self._delete(name)

    # ------------------------------------------------------------------ reading

    def list(self, verify: bool = True) -> list[BundleInfo]:
        """Every bundle (published, or in progress on an object store), oldest first; with `verify`,
        each one's sums are checked."""
        infos = []
        for name in self.storage.listdir():
            match = BUNDLE_RE.match(name)
            if match:
                infos.append(self.inspect(name, int(match.group(1)), verify))
        return infos

    def inspect(self, name: str, step: int | None = None, verify: bool = True) -> BundleInfo:
        """Check one bundle: its manifest, and (with `verify`) every file's size and sha256; a bundle
        this store already verified is not hashed again unless a file's size or mtime changed."""
        if step is None:
            match = BUNDLE_RE.match(name)
            step = int(match.group(1)) if match else -1
        listing = self._files(name)
        files = {rel: size for rel, size, _ in listing}
        size = sum(files.values())
        try:
            manifest = json.loads(self.storage.read_bytes(f"{name}/{MANIFEST}"))
        except FileNotFoundError:
            return BundleInfo(
                name, step, size, "no manifest (a save in progress, or one that did not finish)"
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            return BundleInfo(name, step, size, "manifest is not valid JSON")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return BundleInfo(name, step, size, f"manifest format is not {FORMAT}")
        meta, created = manifest.get("meta", {}), float(manifest.get("created", 0.0))
        listed: dict[str, dict[str, Any]] = manifest.get("files", {})
        files.pop(MANIFEST, None)
        problem = _compare_sizes(listed, files)
        if problem is None and verify and self._verified.get(name) != listing:
            for rel, entry in listed.items():
                if self._sha256(f"{name}/{rel}") != entry["sha256"]:
                    problem = f"{rel}: sha256 mismatch"
                    break
            if problem is None:
                self._verified[name] = listing
        return BundleInfo(name, step, size, problem, meta, created)

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
        return [rel for rel, _, _ in self._files(bundle) if rel != MANIFEST]

    def location(self, bundle: str) -> str:
        """Where `bundle` is, as a path or URI that `BundleStore(root)` + name opens again."""
        return f"{self.storage.uri.rstrip('/')}/{bundle}"

    # ------------------------------------------------------------------ runs

    def runs(self) -> list[BundleStore]:
        """This store and the stores of the later runs kept in folders inside it (`run-XXXXXXXX`)."""
        return [self] + [
            BundleStore(self.storage.child(name)) for name in self.storage.listdir() if RUN_RE.match(name)
        ]

    def new_run(self) -> BundleStore:
        """A store in a new `run-XXXXXXXX` folder inside this one (created by its first save)."""
        taken = set(self.storage.listdir())
        name = f"run-{uuid.uuid4().hex[:8]}"
        while name in taken:
            name = f"run-{uuid.uuid4().hex[:8]}"
        return BundleStore(self.storage.child(name))

    def holds_bundles(self) -> bool:
        """Whether anything of a save is here: a bundle (valid or not) or a temporary dir."""
        return any(BUNDLE_RE.match(n) or n.startswith(TMP_PREFIX) for n in self.storage.listdir())

    # ------------------------------------------------------------------ pruning

    def prune(self, keep_last: int) -> list[str]:
        """Delete all but the newest `keep_last` bundles that verify (sha256); return the names deleted.

        Newest first, each bundle is verified until `keep_last` have; older ones go unread. Invalid
        bundles and abandoned temporary dirs older than the newest valid bundle go too; invalid ones
        newer than it stay (on an object store that is a save in progress). The newest bundle that
        verifies is never deleted, whatever `keep_last` says; with none that verifies, nothing is.
        """
        keep_last = max(keep_last, 1)
        kept: list[BundleInfo] = []
        doomed: list[str] = []
        for info in reversed(self.list(verify=False)):
            if len(kept) == keep_last:
                doomed.append(info.name)
                continue
            checked = self.inspect(info.name, info.step, verify=True) if info.valid else info
            if checked.valid:
                kept.append(checked)
            elif kept:
                doomed.append(info.name)
        if not kept:
            return []
        newest = kept[0].step
        doomed += [
            name
            for name in self.storage.listdir()
            if name.startswith(TMP_PREFIX) and _tmp_step(name) is not None and _tmp_step(name) < newest
        ]
        for name in doomed:
            self._delete(name)
        return doomed

    def _delete(self, name: str) -> None:
        # The manifest goes first: a delete that stops half-way leaves a bundle without one (invalid),
        # never a manifest that vouches for files being removed.
        self.storage.delete_file(f"{name}/{MANIFEST}")
        self.storage.delete_dir(name)
        self._verified.pop(name, None)

    # ------------------------------------------------------------------ helpers

    def _files(self, path: str) -> Listing:
        return list(self.storage.walk_files(path))

    def _sha256(self, path: str) -> str:
        return self._digest(path)[1]

    def _digest(self, path: str) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        for chunk in self.storage.iter_chunks(path):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()


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
