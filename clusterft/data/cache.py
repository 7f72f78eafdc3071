"""The tokenized-dataset cache: built once, published atomically, memory-mapped by every worker.

    cache_dir/
      3f9c…/                  one entry per key (data spec + data files + tokenizer)
        train.arrow           Arrow IPC file, record batches of encoded (or packed) rows
        eval.arrow
        eval_examples.jsonl   the held-out conversations (exact-match evaluation generates from them)
        meta.json             written last: the key's inputs, each file's size and sha256, row counts
        verified.json         what a full check found: each file's size, mtime, ctime and inode then

A builder writes into a private `.tmp-*` directory and renames it to the key: on POSIX the rename
is atomic and fails if another builder published first, so concurrent builders never mix files and
a reader sees a whole entry or none. An entry that fails its checks (a file missing, truncated or
altered, unreadable Arrow) is moved aside and rebuilt, with a warning that says why.

Opening an entry hashes every file (a full check), except where the caller trusts a verification
(`trust_verified`: a training worker, whose driver fully checked this entry in its preflight just
before): if every file's size, mtime, ctime and inode are those that the last full check recorded in
verified.json, the hashes are skipped. A file written since (its ctime moves with any write, and
cannot be set back) fails the stamp and gets the full check; only damage below the filesystem
(bit rot) between the driver's check and the worker's open would pass unseen.

The key covers what changes the encoded rows: the data section's options, each dataset's
dataset_info entry and its file's path, size and mtime (contents are not read: a dataset can be far
larger than RAM), and the tokenizer (its vocabulary and merges, special tokens, chat_template).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clusterft.data.registry import get_dataset_attr
from clusterft.storage.fs import fsync_dir, fsync_file, sha256_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clusterft.config.spec import DataArgs

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the encoding or the files of an entry change meaning
META = "meta.json"
VERIFIED = "verified.json"
TRAIN, EVAL, EVAL_EXAMPLES = "train.arrow", "eval.arrow", "eval_examples.jsonl"
# The data options that change the encoded rows (buffer_size only orders them; workers don't count).
_KEYED_OPTIONS = (
    "dataset", "eval_dataset", "template", "cutoff_len", "val_size", "max_samples", "train_on_prompt",
    "mask_history", "packing", "neat_packing", "streaming",
)  # fmt: skip


def run_cache_dir(run_dir: str | Path) -> Path:
    """A training run's default cache: under its run dir (output_dir/.clusterft), which every
    worker already reads and writes, so the driver's build is found by every worker."""
    return Path(run_dir) / "data_cache"


class CorruptCache(Exception):
    """A cache entry that cannot be used; the message says what is wrong with it."""


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides the token ids: the tokenizer's model (vocabulary, merges, normalizer),
    its special tokens and its chat_template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [
        type(tokenizer).__name__,
        tokenizer.all_special_tokens,
        getattr(tokenizer, "chat_template", None),
    ]
    return hashlib.sha256((model + json.dumps(extra, default=str)).encode()).hexdigest()


def cache_inputs(
    data: DataArgs, dataset_dir: Path, tokenizer: PreTrainedTokenizerBase, seed: int
) -> dict[str, Any]:
    """Everything the encoded rows depend on, as JSON data (stored in meta.json, hashed into the key)."""
    files = {}
    for name in [*data.dataset, *(data.eval_dataset or [])]:
        attr = get_dataset_attr(name, dataset_dir)
        path = (dataset_dir / attr.file_name).resolve()
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None  # the build reports the missing file with its own message
        files[name] = {
            "attr": asdict(attr),
            "path": str(path),
            "bytes": stat.st_size if stat else None,
            "mtime_ns": stat.st_mtime_ns if stat else None,
        }
    options = data.model_dump(include=set(_KEYED_OPTIONS))
    # The seed picks the held-out split; with no split it changes nothing, so it stays out of the key.
    splits = data.val_size > 0 and not data.eval_dataset
    return {
        "format": FORMAT_VERSION,
        "options": options,
        "seed": seed if splits else None,
        "files": files,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CacheEntry:
    """A verified, published entry."""

    path: Path
    meta: dict[str, Any]


def check_entry(path: Path, key: str, *, trust_verified: bool = False) -> CacheEntry:
    """Verify the entry at `path`: meta.json readable and for `key`, every file of the size and
    sha256 it records, every Arrow file readable with the recorded rows. Raises CorruptCache.
    `trust_verified`: skip the sha256 of files unchanged since the last full check (verified.json);
    a full check records what it found there."""
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CorruptCache(f"{META} is missing (a build did not finish)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCache(f"{META} is unreadable ({exc})") from None
    if meta.get("key") != key:
        raise CorruptCache(f"{META} is for key {meta.get('key')!r}, not {key!r}")
    for name, recorded in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CorruptCache(f"{name} is missing")
        if file.stat().st_size != recorded["bytes"]:
            raise CorruptCache(f"{name} has {file.stat().st_size} bytes, {META} says {recorded['bytes']}")
    names = [META, *meta["files"]]
    trusted = trust_verified and _stamp_holds(path, names)
    for name, recorded in meta["files"].items():
        if not trusted and sha256_file(path / name) != recorded["sha256"]:
            raise CorruptCache(f"{name} does not match its sha256 in {META} (altered or damaged)")
    for name, rows in meta["rows"].items():
        try:
            num_rows = pa.ipc.open_file(pa.memory_map(str(path / name), "r")).count_rows()
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorruptCache(f"{name} is not a readable Arrow file ({exc})") from None
        if num_rows != rows:
            raise CorruptCache(f"{name} has {num_rows} rows, {META} says {rows}")
    if not trusted:
        _write_stamp(path, names)
    return CacheEntry(path, meta)


def _file_stats(path: Path, names: list[str]) -> dict[str, list[int]]:
    """What any write to a file changes: size, mtime, ctime (not settable) and inode (a replaced file)."""
    stats = {}
    for name in names:
        st = (path / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return stats


def _write_stamp(path: Path, names: list[str]) -> None:
    """Record what a full check found (atomically: readers see the old stamp or the new). A cache
    the process cannot write to keeps no stamp; its readers then check in full."""
    temp = path / f".{VERIFIED}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temp.write_text(json.dumps({"files": _file_stats(path, names)}))
        os.replace(temp, path / VERIFIED)
    except OSError as exc:
        logger.info("dataset cache %s: no %s written (%s); readers check it in full", path, VERIFIED, exc)
        temp.unlink(missing_ok=True)


def _stamp_holds(path: Path, names: list[str]) -> bool:
    """Whether every file is as the last full check found it."""
    try:
        recorded = json.loads((path / VERIFIED).read_text())["files"]
        return recorded == _file_stats(path, names)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_entry(cache_dir: Path, key: str, *, trust_verified: bool = False) -> CacheEntry | None:
    """The valid entry for `key`, or None. A damaged one is moved aside (and deleted) with a warning
    naming the problem, so that the caller rebuilds it. `trust_verified`: see `check_entry`."""
    path = cache_dir / key
    if not path.is_dir():
        return None
    try:
        return check_entry(path, key, trust_verified=trust_verified)
    except CorruptCache as problem:
        logger.warning("dataset cache %s is unusable: %s; rebuilding it", path, problem)
        discard(path)
        return None


def discard(path: Path) -> None:
    """Remove an entry: renamed first (atomic), so no reader opens it half-deleted."""
    doomed = path.with_name(f".discard-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(doomed)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


def new_build_dir(cache_dir: Path, key: str) -> Path:
    """A private directory to build `key` in (renamed into place by `publish`)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def publish(
    build_dir: Path, cache_dir: Path, key: str, inputs: dict[str, Any], rows: dict[str, int]
) -> CacheEntry:
    """Write meta.json last (sizes and sha256 of the built files), fsync, and rename the build into
    place. If another builder published the same key first, its entry wins and ours is removed."""
    files = {}
    for file in sorted(build_dir.iterdir()):
        fsync_file(file)
        files[file.name] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    meta = {"key": key, "inputs": inputs, "files": files, "rows": rows}
    meta_path = build_dir / META
    with open(meta_path, "w") as handle:
        json.dump(meta, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    target = cache_dir / key
    try:
        build_dir.rename(target)
    except OSError:  # ENOTEMPTY / EEXIST: a concurrent builder won the race
        shutil.rmtree(build_dir, ignore_errors=True)
        return check_entry(target, key)
    fsync_dir(cache_dir)
    _write_stamp(target, [META, *files])  # just hashed: its readers need not hash it again
    return CacheEntry(target, meta)
