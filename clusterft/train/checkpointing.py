"""Training bundles: what a save writes, rank by rank, and what a resume reads back.

    step_000000012/
      trainer.pt          rank 0: global step, data position, LR-scheduler state, compat record, spec hash
      state/rank-0.pt     each rank's shard: its own fp32 weights + AdamW moments + step, and the
      state/rank-1.pt     pieces saying which parameter ranges they hold (state.py)
      rng/rank-0.pt       every rank's RNG states (python, numpy, torch, cuda)
      rng/rank-1.pt
      manifest.json       written last by storage.BundleStore.publish

Every rank writes its files into the bundle's temporary directory and reads them back for their
size and sha256; rank 0 gathers those sums (which waits for every rank) and publishes the bundle
with them (manifest written last), then prunes to `keep_last`. No rank gathers another's state: a
rank writes its own share, and a resume on any number of workers reads the ranges it needs from
every shard (memory-mapped on a local filesystem).

Every file holds tensors and plain data only (RNG states converted by state.rng_state) and is read
with `torch.load(weights_only=True)`: a bundle on shared storage is data, and unpickling it must not
run code, whoever wrote it. Bundles from before this (no `state_format` in their metadata; their RNG
state was pickled numpy objects) are refused with a message that says what to do instead.

Which bundle a run starts from, and which folder it writes to, is decided by `choose_start`, which
changes nothing (the controller shows its answer as the job's `resumed_from`), and carried out once,
by the driver (`start_run`): a run only ever sees, prunes and exports its own bundles.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clusterft.config.spec import JobSpec
from clusterft.errors import UserError
from clusterft.storage import BundleInfo, BundleStore
from clusterft.train.state import MOMENTS, load_weights, whole_tensors_shard

logger = logging.getLogger(__name__)

TRAINER_FILE = "trainer.pt"
# In every bundle's metadata: its files load with weights_only=True; shards/1 holds one state shard
# per rank, tensors/1 (the format before it) consolidated parts, which are still read.
STATE_FORMAT = "shards/1"
READABLE_FORMATS = (STATE_FORMAT, "tensors/1")


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(store: BundleStore, name: str, relpath: str) -> Any:
    try:
        return torch.load(io.BytesIO(store.read_bytes(name, relpath)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{store.location(name)}/{relpath} holds Python objects other than tensors and plain data; "
            f"it is not unpickled (that would run code from shared storage): {err}"
        ) from err


def broadcast_object(value: Any, src: int = 0) -> Any:
    """`value` from rank `src` on every rank (a no-op without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def save_bundle(
    store: BundleStore,
    step: int,
    *,
    rank: int,
    shard: dict[str, Any] | None,
    trainer: dict[str, Any] | None,
    rng: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    local_state: dict[str, Any] | None = None,
) -> BundleInfo | None:
    """Write this rank's share of the bundle for `step`; rank 0 publishes it. Collective.

    `shard` is this rank's training state (state.shard_state; None on a rank that holds nothing to
    save); `trainer` is given on rank 0 only; `local_state` is rank-specific state that is not in
    shards (AutoTP's optimizer slices). Returns the published bundle on rank 0, None elsewhere.
    """
    tmp = broadcast_object(store.begin(step) if rank == 0 else None)
    written: dict[str, dict[str, Any]] = {}

    def put(relpath: str, obj: Any) -> None:
        # torch.save writes each tensor's storage straight to the file: no bytes copy of the shard.
        store.put_written(tmp, relpath, lambda path: torch.save(obj, path))
        written[relpath] = store.file_sum(tmp, relpath)  # read back: the rank vouches for what is stored

    if shard is not None:
        put(f"state/rank-{rank}.pt", shard)
    if trainer is not None:
        put(TRAINER_FILE, trainer)
    put(f"rng/rank-{rank}.pt", rng)
    if local_state is not None:
        put(f"local/rank-{rank}.pt", local_state)
    # Every rank's files are written and verified before the manifest vouches for them.
    gathered = _gather_to_first(written)
    if rank != 0:
        return None
    sums = {rel: entry for part in gathered for rel, entry in part.items()}
    info = store.publish(tmp, step, {**meta, "state_format": STATE_FORMAT}, sums=sums)
    store.prune(keep_last)
    return info


def _gather_to_first(value: Any) -> list[Any]:
    """Every rank's `value` on rank 0 (others get []); a no-op without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    first = dist.get_rank() == 0
    box: list[Any] | None = [None] * dist.get_world_size() if first else None
    dist.gather_object(value, box, dst=0)
    return box or []


@dataclass(frozen=True)
class LoadedBundle:
    """A published bundle as a worker reads it: the small files at once, the state shards on demand
    (`read_shards`), so nothing holds more than one shard of the state at a time."""

    store: BundleStore
    name: str
    trainer: dict[str, Any]
    shard_files: tuple[str, ...]
    state_format: str
    rng: dict[str, Any] | None  # this rank's, when the bundle has one for it
    local: dict[str, Any] | None  # this rank's state that is not in shards (AutoTP), if any


def load_bundle(store: BundleStore, name: str, rank: int) -> LoadedBundle:
    """Read a published bundle (already verified by the caller, e.g. by `find_latest_valid`)."""
    files = store.files(name)
    if TRAINER_FILE not in files:
        raise UserError(f"{name} is not a clusterft training checkpoint (no {TRAINER_FILE})")
    state_format = store.inspect(name, verify=False).meta.get("state_format")
    if state_format not in READABLE_FORMATS:
        raise UserError(
            f"{store.location(name)} was written by an older clusterft, whose checkpoints hold pickled "
            "Python objects; they are not loaded (unpickling a file from shared storage runs code), so "
            "this run cannot resume from it. Start a new run: another checkpoint.name (or "
            "resume.enabled: false with overwrite_output_dir: true); to keep the old weights, train "
            "from the model that run exported to its output_dir"
        )
    trainer = _loads(store, name, TRAINER_FILE)
    shard_files = tuple(sorted(f for f in files if f.startswith("state/")))
    rng_file = f"rng/rank-{rank}.pt"
    rng = _loads(store, name, rng_file) if rng_file in files else None
    local_file = f"local/rank-{rank}.pt"
    local = _loads(store, name, local_file) if local_file in files else None
    return LoadedBundle(store, name, trainer, shard_files, state_format, rng, local)


def read_shards(bundle: LoadedBundle) -> Iterator[dict[str, Any]]:
    """The bundle's state shards, one at a time (memory-mapped where the storage is a local disk:
    only the pages a restore copies from are read)."""
    for relpath in bundle.shard_files:
        local = bundle.store.storage.local_path(f"{bundle.name}/{relpath}")
        if local is not None:
            try:
                shard = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as err:
                raise UserError(
                    f"{local} holds Python objects other than tensors and plain data: {err}"
                ) from err
        else:
            shard = _loads(bundle.store, bundle.name, relpath)
        yield shard if bundle.state_format == STATE_FORMAT else _part_as_shard(shard)


def _part_as_shard(part: dict[str, Any]) -> dict[str, Any]:
    """A consolidated part of a tensors/1 bundle (full tensors by name) as a shard."""
    shard = whole_tensors_shard(part["weights"])
    names = sorted(part["weights"])
    # Moments are None where the optimizer had not stepped (or AutoTP's parts, which held none).
    if part["step"] is not None and all(part[key].get(n) is not None for key in MOMENTS for n in names):
        for key in MOMENTS:
            shard[key] = [part[key][n].reshape(-1) for n in names]
        shard["step"] = part["step"]
    return shard


def bundle_weights(bundle: LoadedBundle) -> dict[str, torch.Tensor]:
    """Every saved parameter's full weights, by name: for tests and inspection of small models
    (export streams the shards into the model instead)."""
    shapes = {record[0]: tuple(record[1]) for shard in read_shards(bundle) for record in shard["pieces"]}
    weights = {name: torch.zeros(shape) for name, shape in sorted(shapes.items())}
    load_weights(list(weights.items()), read_shards(bundle))
    return weights


def from_checkpoint_bundle(source: Path) -> tuple[BundleStore, BundleInfo]:
    """The bundle `resume.from_checkpoint` names (`source`, resolved), verified where the job runs.

    The spec checks the path's form; whether a bundle is there and verifies is known only here.
    """
    store = BundleStore(source.parent)
    if not store.storage.exists(source.name):
        raise UserError(
            f"resume.from_checkpoint: {source} does not exist; give the path of a checkpoint bundle "
            "(a step_NNNNNNNNN directory under a run's bundles/)"
        )
    info = store.inspect(source.name)
    if not info.valid:
        raise UserError(
            f"resume.from_checkpoint: {source} is not valid: {info.problem}; give a complete bundle "
            f"(`clusterft checkpoints list {source.parent}` shows which are valid)"
        )
    return store, info


def bundle_at(location: str) -> tuple[BundleStore, str]:
    """The store and name of the bundle at `location` (a `BundleStore.location`)."""
    root, name = location.rstrip("/").rsplit("/", 1)
    return BundleStore(root), name


def verified_bundle(location: str) -> tuple[BundleStore, BundleInfo]:
    """The bundle at `location`, verified again: a worker starting from the bundle its driver chose
    checks it where it reads it."""
    store, name = bundle_at(location)
    info = store.inspect(name)
    if not info.valid:
        raise UserError(f"{location}: the checkpoint this run starts from is no longer valid: {info.problem}")
    return store, info


@dataclass(frozen=True)
class RunStart:
    """Where a run writes its bundles and which bundle its workers start from (None: from scratch)."""

    bundle_root: str
    bundle: str | None  # a BundleStore.location


@dataclass(frozen=True)
class StartChoice:
    """What `start_run` will do, as `choose_start` decided it without changing anything."""

    bundle: str | None  # the bundle the run starts from (a BundleStore.location); None: from scratch
    bundle_root: str | None  # the folder it writes to; None: a new `run-XXXXXXXX` folder in the root
    clear: bool  # every bundle under the root is deleted first (resume.enabled false, overwrite_output_dir)


def choose_start(spec: JobSpec, bundle_root: str, from_checkpoint: Path | None) -> StartChoice:
    """Which bundle a run of `spec` starts from and which folder it writes to; reads bundles (and
    verifies the chosen one), changes nothing: `start_run` carries the choice out.

    The bundle: (1) the newest valid bundle of a folder holding one written with this very spec (its
    own progress: a relaunched driver continues it); else (2) `resume.from_checkpoint`; else (3) the
    newest valid bundle of the run under `bundle_root` that saved last. The folder: the bundle's own,
    when the run resumes it exactly (the same run, continued); otherwise (weights only, or a bundle
    from elsewhere) `bundle_root` if it holds nothing yet, else a new `run-XXXXXXXX` folder inside
    it, so an earlier run's bundles are neither pruned by this run nor taken for its own (its steps
    start again from 0, and would otherwise sort below the earlier run's). With resume.enabled false,
    the bundles under `bundle_root` are deleted first (overwrite_output_dir), or the run is refused.
    """
    root = BundleStore(bundle_root)
    runs = root.runs()
    clear = False
    if not spec.resume.enabled and (stale := _newest_valid(runs)) is not None:
        if not spec.train.overwrite_output_dir:
            raise UserError(
                f"resume.enabled is false but {bundle_root} holds checkpoints (newest "
                f"{stale[0].location(stale[1].name)}); set overwrite_output_dir: true to delete them, "
                "or use another checkpoint.name"
            )
        if from_checkpoint is not None and _inside(from_checkpoint, bundle_root):
            raise UserError(
                f"resume.from_checkpoint: {from_checkpoint} is inside {bundle_root}, whose checkpoints "
                "resume.enabled false with overwrite_output_dir true deletes before the run starts; "
                "copy the bundle elsewhere first, or set resume.enabled: true"
            )
        runs, clear = [], True  # deleted by start_run: nothing of them to start from
    spec_hash = spec.spec_hash()
    # Manifests only (no hashing) to order the runs, newest save first, and to find this spec's own.
    listed = sorted(((run, run.list(verify=False)) for run in runs), key=_last_saved, reverse=True)
    own = _newest_valid(
        [run for run, infos in listed if any(i.meta.get("spec_hash") == spec_hash for i in infos)]
    )
    folder: BundleStore | None
    if own is not None:
        (store, info), folder = own, own[0]
    elif from_checkpoint is not None:
        (store, info), folder = from_checkpoint_bundle(from_checkpoint), None
    elif (latest := _newest_valid([run for run, _ in listed])) is not None:
        (store, info), folder = latest, latest[0]
    else:
        return StartChoice(None, root.storage.uri, clear)
    if spec.resume.weights_only and info.meta.get("spec_hash") != spec_hash:
        folder = None  # weights only: a new run
    if folder is None and (clear or not root.holds_bundles()):
        folder = root
    return StartChoice(store.location(info.name), folder.storage.uri if folder else None, clear)


def start_run(spec: JobSpec, bundle_root: str, from_checkpoint: Path | None) -> RunStart:
    """Decide, once per driver, which bundle a run starts from and which folder it writes to
    (`choose_start`), and carry it out: delete the stale bundles, make the new run's folder."""
    choice = choose_start(spec, bundle_root, from_checkpoint)
    root = BundleStore(bundle_root)
    if choice.clear:
        root.storage.delete_dir("")
    folder = choice.bundle_root or root.new_run().storage.uri
    if choice.bundle is not None and not choice.bundle.startswith(f"{folder.rstrip('/')}/"):
        logger.info("this run starts from %s; its bundles go to %s", choice.bundle, folder)
    return RunStart(folder, choice.bundle)


def _newest_valid(runs: list[BundleStore]) -> tuple[BundleStore, BundleInfo] | None:
    for run in runs:
        if (latest := run.find_latest_valid()) is not None:
            return run, latest
    return None


def _inside(path: Path, bundle_root: str) -> bool:
    """Whether `path` is inside `bundle_root` (a local folder; never inside a URI's)."""
    return "://" not in bundle_root and Path(bundle_root).resolve() in path.resolve().parents


def _last_saved(listed: tuple[BundleStore, list[BundleInfo]]) -> float:
    return max((info.created for info in listed[1] if info.valid), default=0.0)
