"""Weight-only int8 quantization with per-group scales (symmetric, absmax).

Each row of a linear weight (out, in) is cut into groups of `group_size` input columns; a group keeps
one float scale = absmax / 127 and int8 values round(w / scale). Memory per weight: 1 byte plus
4 / group_size bytes of scale, against 4 bytes in fp32. Dequantization happens in the forward pass.
"""

from __future__ import annotations

import torch


def quantize_int8(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (qweight (out, in) int8, scales (out, ceil(in / group_size)) float32)."""
    out_features, in_features = weight.shape
    num_groups = -(-in_features // group_size)
    padded = torch.zeros(out_features, num_groups * group_size, dtype=torch.float32)
    padded[:, :in_features] = weight.float()
    groups = padded.view(out_features, num_groups, group_size)
    scales = groups.abs().amax(dim=-1).clamp(min=1e-12) / 127.0  # (out, num_groups)
    qweight = torch.round(groups / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return qweight.view(out_features, -1)[:, :in_features].contiguous(), scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype):
    """Inverse of quantize_int8 (up to rounding): (out, in) weight in `dtype`."""
    out_features, in_features = qweight.shape
    num_groups = scales.shape[1]
    if in_features == num_groups * group_size:  # the usual case: no padding to undo
        groups = qweight.view(out_features, num_groups, group_size).to(torch.float32)
        return (groups * scales[..., None]).view(out_features, in_features).to(dtype)
    padded = torch.zeros(out_features, num_groups * group_size, dtype=torch.float32)
    padded[:, :in_features] = qweight.float()
    weight = (padded.view(out_features, num_groups, group_size) * scales[..., None]).view(out_features, -1)
    return weight[:, :in_features].to(dtype)
