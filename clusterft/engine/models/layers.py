"""Building blocks of the paged decoder models: RMSNorm, rotary embedding, linear layers that can
hold int8 weights and per-adapter LoRA deltas, and the tensor-parallel context.

Tensor parallelism (Megatron style) is in the shapes from the start: a worker with `tp_size > 1`
holds attention heads [h0:h1] (column-parallel q/k/v, row-parallel o_proj) and a slice of the MLP
(column-parallel gate/up, row-parallel down); row-parallel outputs are summed by `all_reduce`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clusterft.engine.fused_attention import add_rms_norm, rotary_embedding_
from clusterft.hf.quant import dequantize_int8, quantize_int8

Rotated = tuple[torch.Tensor, torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity, compare=False)


@dataclass
class LoRAMapping:
    """Which tokens use which resident adapter slot: [(slot, token indices or None for all)]."""

    groups: list[tuple[int, torch.Tensor | None]]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's op order, so that fp32 results match bit for bit.
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)

    def add_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, fused: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, this norm of it): a sublayer's output joins the residual stream, and the
        next sublayer's input is normed from it (delta None: hidden as it is). The fused kernel does
        both in one call for fp32, with the same results."""
        if delta is None:
            return hidden, self(hidden)
        if fused and hidden.dtype == delta.dtype == self.weight.dtype == torch.float32:
            return add_rms_norm(hidden, delta, self.weight, self.eps)
        hidden = hidden + delta
        return hidden, self(hidden)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_positions), computed as HF computes them per step."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int) -> None:
        super().__init__()
        freqs = torch.arange(max_positions)[:, None].float() * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: (T, h, hd), k: (T, kvh, hd) -> rotated q, k."""
        return self.at(positions, fused=False)(q, k)

    def at(self, positions: torch.Tensor, fused: bool) -> Callable[[torch.Tensor, torch.Tensor], Rotated]:
        """The rotation of one step's positions, made once per step and applied in every layer: the
        torch path gathers cos/sin once; the fused kernel rotates q and k in place (same results)."""
        if fused:

            def rotate_in_place(q: torch.Tensor, k: torch.Tensor) -> Rotated:
                rotary_embedding_(q, k, positions, self.cos, self.sin)
                return q, k

            return rotate_in_place
        cos = self.cos[positions].unsqueeze(1)  # (T, 1, hd)
        sin = self.sin[positions].unsqueeze(1)

        def rotate(q: torch.Tensor, k: torch.Tensor) -> Rotated:
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s

        return rotate


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedLinear(nn.Module):
    """y = x W^T + b for projections packed along the output dim (q|k|v, gate|up, or just one).

    The weight may be int8 with per-group scales (weight-only quantization), and each resident LoRA
    slot may add `(x A^T) B^T * scale` to the output columns of one packed projection.
    """

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = out_sizes
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in out_sizes.items():
            self.offsets[name] = (start, start + size)
            start += size
        self.weight: torch.Tensor | None = nn.Parameter(torch.empty(start, in_features, dtype=dtype), False)
        self.bias = nn.Parameter(torch.zeros(start, dtype=dtype), False) if bias else None
        self.qweight: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.group_size = 0
        self.dtype = dtype
        # slot -> [(A (r, in), B (out_part, r), scale, col_start, col_end)]
        self.loras: dict[int, list[tuple[torch.Tensor, torch.Tensor, float, int, int]]] = {}

    def quantize_(self, group_size: int) -> None:
        self.qweight, self.scales = quantize_int8(self.weight.data, group_size)
        self.group_size = group_size
        self.weight = None

    def forward(self, x: torch.Tensor, lora: LoRAMapping | None = None) -> torch.Tensor:
        weight = self.weight
        if weight is None:
            weight = dequantize_int8(self.qweight, self.scales, self.group_size, self.dtype)
        y = F.linear(x, weight, self.bias)
        if lora is not None and self.loras:
            for slot, index in lora.groups:
                for a, b, scale, start, end in self.loras.get(slot, ()):
                    if index is None:
                        y[:, start:end] += F.linear(F.linear(x, a), b) * scale
                    else:
                        y[index, start:end] += F.linear(F.linear(x[index], a), b) * scale
        return y
