"""Rank-independent training state: consolidate what DeepSpeed partitions, and put it back.

A checkpoint stores, per trainable parameter (by name), the fp32 master weight and AdamW's two
moments in full, plus AdamW's step count. Nothing in it depends on how many workers wrote it, so a
run saved on N workers resumes on M (resharding), and restoring on N workers puts every partition
back bit for bit (exact resume).

    ZeRO stage   where the state lives            how it is read / written
    0 (ddp)      optimizer.state[param]            directly (every rank holds all of it)
    1, 2         flat fp32 partitions per rank      DeepSpeed's tensor-fragment API (all-reduce)
    3            flat fp32 partitions per rank      the same API, also for the weights themselves

AdamW (torch) creates its state lazily on the first step, so a restore before any step first makes
zero-filled state for every flat partition and links DeepSpeed's fragments to it, then fills it.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_optimizer_state,
)

MOMENTS = ("exp_avg", "exp_avg_sq")
NamedParams = list[tuple[str, torch.nn.Parameter]]


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer holding the state (ZeRO wraps it; without ZeRO it is the engine's own)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _optimizer_params(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps state for. ZeRO-3 keeps its fp32 partitions in
    `fp32_partitioned_groups_flat`; with offload it lends them to the optimizer's param groups only
    for the length of a step, so the groups are empty in between and cannot be used to find them."""
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats:
        return list(flats)
    return [p for group in _inner_optimizer(engine).param_groups for p in group["params"]]


def _is_zero(engine) -> bool:
    return engine.zero_optimization_stage() > 0


def gather_state(engine, named_params: NamedParams) -> dict[str, Any]:
    """Full fp32 weights and AdamW moments of `named_params`, plus the step count.

    A collective under ZeRO: every rank of the data-parallel group must call it, in the same order.
    """
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in MOMENTS}
    optimizer = _inner_optimizer(engine)
    zero = _is_zero(engine)
    for name, param in named_params:
        if zero:
            weights[name] = safe_get_full_fp32_param(param).detach().cpu().clone()
            for key in MOMENTS:
                moments[key][name] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
        else:
            weights[name] = param.detach().cpu().clone()
            state = optimizer.state.get(param, {})
            for key in MOMENTS:
                moments[key][name] = state[key].detach().cpu().clone() if key in state else None
    steps = [s["step"] for s in optimizer.state.values() if "step" in s]
    return {"weights": weights, **moments, "step": steps[0].clone() if steps else None}


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


def restore_optimizer_state(engine, named_params: NamedParams, saved: dict[str, Any]) -> None:
    """Put saved AdamW moments and step back into the engine's (possibly partitioned) optimizer.

    The weights themselves are restored earlier, into the module before `deepspeed.initialize`, so
    every fp32 partition DeepSpeed makes from them is already an exact copy.
    """
    if saved["step"] is None:
        return  # saved before any optimizer step: nothing to restore
    optimizer = _inner_optimizer(engine)
    for flat in _optimizer_params(engine):
        optimizer.state[flat] = {
            "step": saved["step"].clone(),
            **{key: torch.zeros_like(flat, memory_format=torch.preserve_format) for key in MOMENTS},
        }
    if _is_zero(engine):
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 point each parameter's fragment at the new state
            link()
        for name, param in named_params:
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, saved[key][name].to(param.device), key)
        return
    for name, param in named_params:
        for key in MOMENTS:
            optimizer.state[param][key].copy_(saved[key][name])


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
