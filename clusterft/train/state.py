"""Training state, sharded: each rank saves and restores only what it holds.

Every rank writes one shard: its fp32 master weights and AdamW moments, as the flat tensors it
already holds, plus a list of pieces saying which element range of which parameter (by name, in its
flattened form) sits where in them. Nothing is gathered: a save writes ~12 bytes per trainable
parameter divided by the data-parallel size, and needs no copy of the rank's state under ZeRO.

    strategy     a rank's flats                           its pieces
    ddp          every parameter (the optimizer's own)    1/N of each parameter (a slice is copied)
    ZeRO-1, 2    its flat fp32 partitions                 the fragments DeepSpeed maps into them
    ZeRO-3       its flat fp32 partitions                 each parameter's partition (rank * size)

A restore copies, for each element range this rank needs, the overlapping ranges of every shard
(`copy_pieces`). The ranges depend on the worker count, the pieces' names and offsets do not, so a
run saved on N workers resumes on M (resharding), and on N every range comes back bit for bit
(exact resume). Weights go into the module before `deepspeed.initialize` (DeepSpeed makes its fp32
partitions from them); moments and the step go into the optimizer after it.

AdamW (torch) creates its state lazily on the first step, so a restore before any step first makes
zero-filled state for every flat and links DeepSpeed's fragments to it, then fills it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clusterft.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")
NamedParams = list[tuple[str, torch.nn.Parameter]]
SHARD_FORMAT = "shard/1"


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer holding the state (ZeRO wraps it; without ZeRO it is the engine's own)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _is_zero(engine) -> bool:
    return engine.zero_optimization_stage() > 0


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of parameter `name` (flattened) are at [offset, offset + numel)
    of flat tensor `flat`."""

    name: str
    shape: tuple[int, ...]
    start: int
    numel: int
    flat: int
    offset: int

    def as_record(self) -> list[Any]:  # plain data: shards load with weights_only=True
        return [self.name, list(self.shape), self.start, self.numel, self.flat, self.offset]

    @staticmethod
    def from_record(record: list[Any]) -> Piece:
        name, shape, start, numel, flat, offset = record
        return Piece(name, tuple(shape), start, numel, flat, offset)


@dataclass(frozen=True)
class Layout:
    """Where this rank's share of the training state lives.

    `flats[i]` is a 1-D fp32 tensor and `keys[i]` the tensor the optimizer keys its state by (the
    same tensor, or the parameter a ddp flat views); `partitioned` says the flats are this rank's
    own ZeRO partitions (saved whole, no copy) rather than replicas a slice of which it saves."""

    flats: list[torch.Tensor]
    keys: list[torch.Tensor]
    pieces: list[Piece]  # what this rank saves
    partitioned: bool

    def held(self) -> list[Piece]:
        """What this rank holds, so restores: its pieces, or every replica flat whole."""
        if self.partitioned:
            return self.pieces
        return [Piece(p.name, p.shape, 0, self.flats[p.flat].numel(), p.flat, 0) for p in self.pieces]


def layout(engine, named_params: NamedParams, dp_rank: int, dp_size: int) -> Layout:
    """This rank's share of `named_params` (trainable, in the engine) and where it lives."""
    stage = engine.zero_optimization_stage()
    zero = engine.optimizer
    pieces: list[Piece] = []
    if stage == 3:
        flats = list(zero.fp32_partitioned_groups_flat)
        for name, param in named_params:
            group, offset, size = zero.grad_position[zero.get_param_id(param)]
            start = zero._get_param_partition_rank(param) * size  # ZeRO-3 pads the last partition
            numel = max(0, min(size, param.ds_numel - start))
            pieces.append(Piece(name, tuple(param.ds_shape), start, numel, group, offset))
        return Layout(flats, flats, pieces, True)
    if stage in (1, 2):
        flats = list(zero.single_partition_of_fp32_groups)
        for name, param in named_params:
            mapping = param._hp_mapping
            if mapping is None:  # no element of this parameter in this rank's partition
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            pieces.append(
                Piece(name, tuple(param.shape), lp.start, lp.numel, mapping.param_group_index, hp.start)
            )
        return Layout(flats, flats, pieces, True)
    # No ZeRO: every rank holds everything; each saves its 1/dp_size slice of every parameter.
    flats, keys = [], []
    for index, (name, param) in enumerate(named_params):
        numel = param.numel()
        chunk = -(-numel // dp_size)
        start = min(dp_rank * chunk, numel)
        pieces.append(Piece(name, tuple(param.shape), start, min(chunk, numel - start), index, start))
        flats.append(param.data.view(-1))
        keys.append(param)
    return Layout(flats, keys, pieces, False)


def shard_state(engine, rank_layout: Layout) -> dict[str, Any]:
    """This rank's shard: its flats' weights and moments (the tensors themselves under ZeRO, only the
    saved slices without it), the pieces that index them, and AdamW's step count."""
    state = _inner_optimizer(engine).state
    tensors: dict[str, list[torch.Tensor]] = {"weights": [], **{key: [] for key in MOMENTS}}
    by_flat: dict[int, list[Piece]] = {}
    for piece in rank_layout.pieces:
        by_flat.setdefault(piece.flat, []).append(piece)
    pieces: list[Piece] = []
    step = None
    for index, (flat, key) in enumerate(zip(rank_layout.flats, rank_layout.keys, strict=True)):
        held = state.get(key, {})
        step = held.get("step", step)
        sources = {"weights": flat, **{m: held[m].view(-1) for m in MOMENTS if m in held}}
        lo, hi = 0, flat.numel()
        if not rank_layout.partitioned:  # a replica: only the slice this rank is responsible for
            own = by_flat.get(index, [])
            lo = min((p.offset for p in own), default=0)
            hi = max((p.offset + p.numel for p in own), default=0)
        saved = len(tensors["weights"])
        for m, source in sources.items():
            region = source if (lo, hi) == (0, flat.numel()) else source[lo:hi].clone()
            tensors[m].append(region.detach().cpu())
        pieces += [
            Piece(p.name, p.shape, p.start, p.numel, saved, p.offset - lo) for p in by_flat.get(index, [])
        ]
    return {
        "format": SHARD_FORMAT,
        **tensors,
        "step": step.clone() if isinstance(step, torch.Tensor) else step,
        "pieces": [p.as_record() for p in pieces],
    }


# A restore target: elements [start, start + numel) of a parameter, and where each kind of saved
# tensor ("weights", "exp_avg", "exp_avg_sq") goes (1-D views of exactly `numel` elements).
Target = tuple[int, int, dict[str, torch.Tensor]]


def copy_pieces(
    targets: dict[str, list[Target]], shapes: dict[str, tuple[int, ...]], shards: Iterable[dict[str, Any]]
) -> torch.Tensor | None:
    """Fill every target from the overlapping pieces of `shards` (read one at a time); returns the
    saved AdamW step. Every element of every target must be found, with its parameter's shape."""
    covered = {name: [0] * len(ranges) for name, ranges in targets.items()}
    step = None
    for shard in shards:
        step = shard.get("step") if step is None else step
        for record in shard["pieces"]:
            piece = Piece.from_record(record)
            if piece.name not in targets:
                continue
            if piece.shape != shapes[piece.name]:
                raise UserError(
                    f"checkpoint tensor {piece.name} has shape {piece.shape}, the model "
                    f"{shapes[piece.name]}: was lora_rank or the model changed?"
                )
            for i, (start, numel, dest) in enumerate(targets[piece.name]):
                lo, hi = max(start, piece.start), min(start + numel, piece.start + piece.numel)
                if lo >= hi:
                    continue
                for kind, tensor in dest.items():
                    if kind not in shard:
                        raise UserError(f"the checkpoint holds no {kind} for {piece.name}")
                    source = shard[kind][piece.flat][piece.offset + lo - piece.start :][: hi - lo]
                    tensor[lo - start : hi - start].copy_(source)
                covered[piece.name][i] += hi - lo
    for name, counts in covered.items():
        for (start, numel, _), count in zip(targets[name], counts, strict=True):
            # Overlapping replicas (a tied embedding on two pipeline stages) may count twice.
            if count < numel:
                raise UserError(
                    f"checkpoint does not fit this model: elements {start}..{start + numel} of {name} "
                    f"are not in it ({count} found); was the model, finetuning_type or lora_target "
                    "changed? (resume: {weights_only: true} does not help here: start a new run)"
                )
    return step


def weight_targets(named_params: NamedParams) -> tuple[dict[str, list[Target]], dict[str, tuple[int, ...]]]:
    """Targets that fill whole parameters (of a module not yet partitioned) with saved weights."""
    targets = {name: [(0, p.numel(), {"weights": p.data.view(-1)})] for name, p in named_params}
    return targets, {name: tuple(p.shape) for name, p in named_params}


def load_weights(named_params: NamedParams, shards: Iterable[dict[str, Any]]) -> None:
    """Put the saved weights into whole parameters: before `deepspeed.initialize`, or for export."""
    with torch.no_grad():
        copy_pieces(*weight_targets(named_params), shards)


def restore_moments(engine, rank_layout: Layout, shards: Iterable[dict[str, Any]]) -> None:
    """Put the saved AdamW moments and step into this rank's part of the optimizer state."""
    optimizer = _inner_optimizer(engine)
    for key in rank_layout.keys:
        optimizer.state[key] = {
            "step": torch.zeros((), dtype=torch.float32),
            **{m: torch.zeros_like(key, memory_format=torch.preserve_format) for m in MOMENTS},
        }
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if _is_zero(engine) and link is not None:  # ZeRO-1/2 point each parameter's fragment at the state
        link()
    targets: dict[str, list[Target]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for piece in rank_layout.held():
        state = optimizer.state[rank_layout.keys[piece.flat]]
        dest = {m: state[m].view(-1)[piece.offset : piece.offset + piece.numel] for m in MOMENTS}
        targets.setdefault(piece.name, []).append((piece.start, piece.numel, dest))
        shapes[piece.name] = piece.shape
    step = copy_pieces(targets, shapes, shards)
    if step is None:
        for key in rank_layout.keys:  # saved before any optimizer step: AdamW starts afresh
            del optimizer.state[key]
        return
    for key in rank_layout.keys:
        optimizer.state[key]["step"] = step.clone()


def gather_tensor_parallel_weights(engine) -> dict[str, torch.Tensor]:
    """Full weights of an AutoTP model (each rank holds a slice of every split linear). Collective."""
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    weights: dict[str, torch.Tensor] = {}
    for prefix, module in engine.module.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with GatherReplacedLayerParams(params, module, enabled=True):
            for name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    weights[f"{prefix}.{name}" if prefix else name] = param.detach().cpu().clone()
    return weights


def whole_tensors_shard(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A shard of whole tensors (weights only): AutoTP's gathered weights, and bundles written before
    shards (one consolidated part), read the same way as any other shard."""
    names = sorted(weights)
    return {
        "format": SHARD_FORMAT,
        "weights": [weights[n].reshape(-1) for n in names],
        "step": None,
        "pieces": [
            Piece(n, tuple(weights[n].shape), 0, weights[n].numel(), i, 0).as_record()
            for i, n in enumerate(names)
        ],
    }


def local_tensor_parallel_state(engine, named_params: NamedParams) -> dict[str, Any]:
    """An AutoTP rank's own slices of the weights and moments (resumed on the same tensor-parallel
    size only: the slices are not flat ranges of the full parameters)."""
    state = _inner_optimizer(engine).state
    saved: dict[str, Any] = {"weights": {}, **{m: {} for m in MOMENTS}, "step": None}
    for name, param in named_params:
        saved["weights"][name] = param.detach().cpu().clone()
        held = state.get(param, {})
        for m in MOMENTS:
            saved[m][name] = held[m].detach().cpu().clone() if m in held else None
        saved["step"] = held.get("step", saved["step"])
    return saved


def restore_tensor_parallel_state(engine, named_params: NamedParams, saved: dict[str, Any]) -> None:
    """Put an AutoTP rank's own moment slices back (its weight slices come from the full weights)."""
    if saved["step"] is None:
        return
    optimizer = _inner_optimizer(engine)
    for name, param in named_params:
        optimizer.state[param] = {
            "step": saved["step"].clone(),
            **{m: saved[m][name].clone() for m in MOMENTS},
        }


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds of parameters, fp32 master copies and optimizer moments.

    ZeRO-3 parameters count their local partition (`ds_tensor`); ZeRO's flat fp32 partitions are
    the master copies; without ZeRO the optimizer updates the parameters themselves (no copy).
    """
    params = 0
    for param in engine.module.parameters():
        local = getattr(param, "ds_tensor", param)
        params += local.numel() * local.element_size()
    optimizer = _inner_optimizer(engine)
    # ZeRO-1/2 hand the torch optimizer their flat fp32 partitions; ZeRO-3 keeps them in its own list.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None and _is_zero(engine):
        flats = [p for group in optimizer.param_groups for p in group["params"]]
    master = sum(t.numel() * t.element_size() for t in flats or [])
    moments = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for key, value in state.items()
        if key in MOMENTS
    )
    return {"params": params, "master": master, "moments": moments, "total": params + master + moments}


# ---------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (dropout, LoRA dropout, data helpers), as
    tensors and plain numbers only, so a checkpoint loads with `torch.load(weights_only=True)`."""
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 words, exact in int64
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state()` returned: every generator continues exactly where it was."""
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["mt"].tolist()), python["gauss_next"]))
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
