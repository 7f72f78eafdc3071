"""Loader of the decoder's fused CPU kernels (csrc/paged_attention.cpp): paged decode attention,
rotary embedding in place, the K/V cache write, and the residual add with RMSNorm.

The library is JIT-compiled once into TORCH_EXTENSIONS_DIR (the way DeepSpeed builds its CPU ops) and
registers `torch.ops.clusterft.{paged_decode_attention,rotary_embedding_,write_kv,add_rms_norm}`.
Later processes load the cached library. One switch (`attention_backend`) takes all or none.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
# -fopenmp-simd: the `omp simd` reductions vectorise without -ffast-math (no OpenMP runtime).
# -ffp-contract=off: no fused multiply-add, so the element-wise kernels round as torch does.
CFLAGS = ["-O3", "-fopenmp-simd", "-ffp-contract=off"]

logger = logging.getLogger(__name__)


class FusedAttentionUnavailable(RuntimeError):
    """The kernel could not be built or loaded; the message says why."""


@functools.cache
def _build_error() -> str | None:
    """Build (first time) and load the kernel into this process, once; why it failed, or None."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name="clusterft_paged_attention",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            is_python_module=False,
            verbose=bool(os.environ.get("CLUSTERFT_VERBOSE_BUILD")),
        )
    except Exception as e:  # compiler missing, build error, ninja absent: all mean "not here"
        return (
            f"could not build the fused attention kernel {SOURCE} ({type(e).__name__}: {e}); "
            "install g++ and ninja, or set attention_backend='torch'"
        )
    return None


def load() -> None:
    """Make torch.ops.clusterft.paged_decode_attention available; raises FusedAttentionUnavailable."""
    error = _build_error()
    if error is not None:
        raise FusedAttentionUnavailable(error)


_warned = False


def use_fused(backend: str, device: torch.device) -> bool:
    """Whether decodes take the fused kernel: 'torch' never, 'fused' always (an error if it cannot
    be built, or off CPU), 'auto' on CPU when it builds, with one warning naming why when not."""
    global _warned
    if backend == "torch" or (backend == "auto" and device.type != "cpu"):
        return False
    if backend == "fused" and device.type != "cpu":
        raise ValueError("attention_backend='fused' is a CPU kernel; use 'auto' or 'torch' on CUDA")
    if backend not in ("auto", "fused"):
        raise ValueError(f"attention_backend must be auto|fused|torch, got {backend!r}")
    error = _build_error()
    if error is None:
        return True
    if backend == "fused":
        raise FusedAttentionUnavailable(error)
    if not _warned:
        _warned = True
        logger.warning("attention_backend=auto falls back to the torch decode path: %s", error)
    return False


def paged_decode_attention(
    q: torch.Tensor,  # (D, h, hd)
    k_cache: torch.Tensor,  # (num_blocks, kvh, block_size, hd)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (D, max_blocks) int32, padded
    context_lens: torch.Tensor,  # (D,) int32, the decode token included
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # (D, h, hd)
    load()  # once per process (cached); the engine's runner already did it when it chose the backend
    return torch.ops.clusterft.paged_decode_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        scale,
        -1 if sliding_window is None else sliding_window,
    )


def rotary_embedding_(
    q: torch.Tensor,  # (T, h, hd), rows contiguous: rotated in place
    k: torch.Tensor,  # (T, kvh, hd)
    positions: torch.Tensor,  # (T,) int64
    cos: torch.Tensor,  # (max_positions, hd) float32
    sin: torch.Tensor,
) -> None:
    load()
    torch.ops.clusterft.rotary_embedding_(q, k, positions, cos, sin)


def write_kv(
    k: torch.Tensor,  # (T, kvh, hd)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # (num_blocks, kvh, block_size, hd), written in place
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # (T,) int64: block * block_size + offset
) -> None:
    load()
    torch.ops.clusterft.write_kv(k, v, k_cache, v_cache, slots)


def add_rms_norm(
    hidden: torch.Tensor,  # (T, H) float32: the residual stream
    delta: torch.Tensor,  # (T, H) float32: a sublayer's output, added to it
    weight: torch.Tensor,  # (H,) float32
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (hidden + delta, RMSNorm(hidden + delta))
    load()
    return torch.ops.clusterft.add_rms_norm(hidden, delta, weight, eps)
