"""Training bundles: what a save writes, rank by rank, and what a resume reads back.

    step_000000012/
      trainer.pt          rank 0: global step, data position, LR-scheduler state, compat record, spec hash
      state/part-0.pt     fp32 weights + AdamW moments + step of the trainable parameters (consolidated:
      state/part-1.pt     one part per pipeline stage; one in all without pipeline)
      rng/rank-0.pt       every rank's RNG states (python, numpy, torch, cuda)
      rng/rank-1.pt
      manifest.json       written last by storage.BundleStore.publish

Every rank writes its files into the bundle's temporary directory, a barrier waits for all of
them, then rank 0 publishes (checksums, manifest, atomic rename) and prunes to `keep_last`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clusterft.errors import UserError
from clusterft.storage import BundleInfo, BundleStore

TRAINER_FILE = "trainer.pt"


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    # Our own files, whose sha256 the manifest just vouched for; RNG states need full unpickling.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


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
    state_part: tuple[int, dict[str, Any]] | None,
    trainer: dict[str, Any] | None,
    rng: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    local_state: dict[str, Any] | None = None,
) -> BundleInfo | None:
    """Write this rank's share of the bundle for `step`; rank 0 publishes it. Collective.

    `state_part` is (part index, consolidated state) on the ranks that write one; `trainer` is
    given on rank 0 only; `local_state` is rank-specific state that cannot be consolidated (AutoTP
    optimizer slices). Returns the published bundle on rank 0, None elsewhere.
    """
    tmp = broadcast_object(store.begin(step) if rank == 0 else None)
    if state_part is not None:
        index, part = state_part
        store.put_bytes(tmp, f"state/part-{index}.pt", _dumps(part))
    if trainer is not None:
        store.put_bytes(tmp, TRAINER_FILE, _dumps(trainer))
    store.put_bytes(tmp, f"rng/rank-{rank}.pt", _dumps(rng))
    if local_state is not None:
        store.put_bytes(tmp, f"local/rank-{rank}.pt", _dumps(local_state))
    if dist.is_initialized():
        dist.barrier()  # every rank's files are durable before the manifest vouches for them
    if rank != 0:
        return None
    info = store.publish(tmp, step, meta)
    store.prune(keep_last)
    return info


@dataclass(frozen=True)
class LoadedBundle:
    name: str
    trainer: dict[str, Any]
    state: dict[str, Any]  # parts merged: weights / exp_avg / exp_avg_sq by parameter name, and step
    rng: dict[str, Any] | None  # this rank's, when the bundle has one for it
    local: dict[str, Any] | None  # this rank's un-consolidated optimizer state (AutoTP), if any


def load_bundle(store: BundleStore, name: str, rank: int) -> LoadedBundle:
    """Read a published bundle (already verified by the caller's `find_latest_valid`)."""
    files = store.files(name)
    if TRAINER_FILE not in files:
        raise UserError(f"{name} is not a clusterft training checkpoint (no {TRAINER_FILE})")
    trainer = _loads(store.read_bytes(name, TRAINER_FILE))
    state: dict[str, Any] = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": None}
    for part_file in sorted(f for f in files if f.startswith("state/")):
        part = _loads(store.read_bytes(name, part_file))
        for key in ("weights", "exp_avg", "exp_avg_sq"):
            state[key].update(part[key])
        if part["step"] is not None:
            state["step"] = part["step"]
    rng_file = f"rng/rank-{rank}.pt"
    rng = _loads(store.read_bytes(name, rng_file)) if rng_file in files else None
    local_file = f"local/rank-{rank}.pt"
    local = _loads(store.read_bytes(name, local_file)) if local_file in files else None
    return LoadedBundle(name, trainer, state, rng, local)


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
