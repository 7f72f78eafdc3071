"""Paged attention, torch reference path: K/V live in blocks, reached through block tables.

A step's batch is flattened to T tokens. The first `num_decodes` tokens are single-token decode
queries (one per request); the rest are prefill chunks, one contiguous run per request.

    tokens: | d0 | d1 | d2 | p0 p0 p0 p0 p0 | p1 p1 p1 |
    slot = block_table[pos // block_size] * block_size + pos % block_size

A layer's cache is (num_blocks, kvh, block_size, hd): each block holds, per KV head, a contiguous
(block_size, hd) matrix. Each layer first writes the step's new K/V, then reads. Decodes are done
block-wise for the whole batch at once, without padding every request to the longest context:
scores of each (request, block) pair by one batched matmul, a softmax segmented by request (max and
sum reduced over each request's blocks), and the weighted V summed back per request. The matmuls
read the cache in place, over a few ranges of block ids that cover the decodes' blocks
(plan_decode_blocks): decode attention is bound by reading K/V, and copying blocks out first
tripled that traffic (read, write, read again) on CPU. Each prefill chunk attends over its cached
prefix plus itself, causally, with SDPA.

On CPU the decodes normally take the fused kernel instead (fused_attention.py, csrc/): one pass per
(request, KV head) over its block table with an online softmax, no score tensors. The metadata then
carries padded block tables and context lengths and no plan; the path here stays the reference the
kernel is tested against, and the fallback where it cannot be built, and the path on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clusterft.engine.fused_attention import paged_decode_attention
from clusterft.engine.fused_attention import write_kv as fused_write_kv

# An idle run of more blocks than this between two blocks the decodes read starts a new in-place
# range instead of being read for nothing: a range costs a few ops per layer, about what reading
# 32 idle blocks costs (measured on CPU, 1 thread: ~3.4 us per block and layer, ~100 us per range).
MAX_IDLE_BLOCKS = 32
MAX_IN_PLACE_RANGES = 8  # beyond this, the smallest gaps are read through rather than split at


@dataclass
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the flat batch
    query_len: int
    num_computed: int  # tokens of this request already in the cache before the chunk
    context_block_ids: torch.Tensor | None  # blocks holding the prefix and the chunk; None: no prefix


@dataclass
class DecodeBlocks:
    """(request, block) pairs of the step's decodes, read either in place or gathered.

    In place: blocks [block_start, block_start + R) of the cache, a view, no copy; blocks that no
    decode reads in that range have owner D (a dummy request) and no valid slot. Gathered: the listed
    block ids are copied into reused scratch buffers (a block shared by several decodes, e.g. a
    cached prefix, is read in place for one of them and gathered for the others).
    """

    owner: torch.Tensor  # (R,) decode index 0..D-1 reading each block, D for none
    valid: torch.Tensor  # (R, block_size) True where the slot is in the owner's context
    block_start: int | None = None  # in place: first block of the range
    block_ids: torch.Tensor | None = None  # gathered: which blocks
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # gathered: (R, kvh, bs, hd) scratch for K, V


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    num_decodes: int
    decode_blocks: list[DecodeBlocks]
    prefills: list[PrefillChunk]
    sliding_window: int | None = None  # key j is visible to query i only if i - W < j <= i
    # Fused decode kernel: (D, max_blocks) int32 block tables, padded, and (D,) int32 context lengths
    # (the decode token included). Set instead of decode_blocks when the fused backend is active.
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    fused_kernels: bool = False  # rotary and K/V writes take the fused CPU kernels too


def plan_decode_blocks(
    block_tables: list[list[int]],
    context_lens: torch.Tensor,  # (D,) tokens in each decode's context, its new token included
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
    scratch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
) -> list[DecodeBlocks]:
    """How the step's decodes read their blocks: every block in place, in at most
    MAX_IN_PLACE_RANGES ranges of block ids (split where more than MAX_IDLE_BLOCKS idle blocks lie
    between two read ones); a block read by several decodes (a shared prefix, forks) is read in place
    for its first reader and gathered into `scratch(n)` buffers for the others."""
    d = len(block_tables)
    counts = torch.tensor([len(table) for table in block_tables])
    block_ids = torch.tensor([b for table in block_tables for b in table], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(d), counts)  # (TB,)
    # Each block's first position within its request, against the request's context length.
    block_index = torch.arange(len(block_ids)) - (torch.cumsum(counts, 0) - counts)[owner]
    slot_pos = block_index[:, None] * block_size + torch.arange(block_size)  # (TB, bs)
    context = context_lens[owner][:, None]
    valid = slot_pos < context
    if sliding_window is not None:  # the decode token sits at context_len - 1
        valid &= slot_pos >= context - sliding_window
    # The first reader of each block id: the first of its run in a stable sort by id.
    sorted_ids, order = torch.sort(block_ids, stable=True)
    first_sorted = torch.ones(len(block_ids), dtype=torch.bool)
    first_sorted[1:] = sorted_ids[1:] != sorted_ids[:-1]
    first = torch.empty_like(first_sorted)
    first[order] = first_sorted
    unique = sorted_ids[first_sorted]
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    range_owner = torch.full((hi - lo,), d, dtype=torch.long)  # D: a dummy request, nobody reads it
    range_valid = torch.zeros(hi - lo, block_size, dtype=torch.bool)
    range_owner[block_ids[first] - lo] = owner[first]
    range_valid[block_ids[first] - lo] = valid[first]
    range_owner, range_valid = range_owner.to(device), range_valid.to(device)
    gaps = unique[1:] - unique[:-1] - 1
    cuts = torch.nonzero(gaps > MAX_IDLE_BLOCKS).flatten()
    if len(cuts) >= MAX_IN_PLACE_RANGES:
        cuts = cuts[gaps[cuts].topk(MAX_IN_PLACE_RANGES - 1).indices].sort().values
    starts = [0, *(unique[cuts + 1] - lo).tolist()]  # offsets into [lo, hi)
    ends = [*(unique[cuts] - lo + 1).tolist(), hi - lo]
    parts = [
        DecodeBlocks(range_owner[s:e], range_valid[s:e], block_start=lo + s)
        for s, e in zip(starts, ends, strict=True)
    ]
    shared = ~first
    if bool(shared.any()):
        n = int(shared.sum())
        parts.append(
            DecodeBlocks(owner[shared].to(device), valid[shared].to(device),
                         block_ids=block_ids[shared].to(device), buffers=scratch(n))
        )  # fmt: skip
    return parts


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots, fused: bool = False
) -> None:
    """k_cache, v_cache: (num_blocks, kvh, block_size, hd); k, v: (T, kvh, hd)."""
    if fused:  # one copy loop instead of two advanced-index writes (~35 us each per layer)
        fused_write_kv(k, v, k_cache, v_cache, slots)
        return
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def paged_attention(
    q: torch.Tensor,  # (T, h, hd)
    k: torch.Tensor,  # (T, kvh, hd), this step's keys (already written to the cache)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # (num_blocks, kvh, block_size, hd)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # (T, h, hd)
    head_dim = q.shape[2]
    num_kv_heads = k.shape[1]
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d and meta.decode_block_tables is not None:
        out[:d] = paged_decode_attention(
            q[:d], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
            meta.sliding_window,
        )  # fmt: skip
    elif d:
        out[:d] = _decode_attention(q[:d], k_cache, v_cache, meta.decode_blocks, scale)
    for chunk in meta.prefills:
        s, n = chunk.query_start, chunk.query_len
        qp = q[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, h, n, hd)
        window = meta.sliding_window
        if chunk.context_block_ids is None and (window is None or n <= window):
            # No cached prefix and nothing out of the window: plain causal attention over the chunk.
            kp = k[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, kvh, n, hd)
            vp = v[s : s + n].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ctx = chunk.num_computed + n
            if chunk.context_block_ids is None:
                kp = k[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, kvh, n, hd)
                vp = v[s : s + n].transpose(0, 1).unsqueeze(0)
            else:
                kp = k_cache[chunk.context_block_ids].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
                vp = v_cache[chunk.context_block_ids].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
                kp, vp = kp[None, :, :ctx], vp[None, :, :ctx]  # (1, kvh, ctx, hd)
            q_pos = torch.arange(chunk.num_computed, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            mask = k_pos <= q_pos  # (n, ctx): key j visible to query i
            if window is not None:
                mask &= k_pos > q_pos - window
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s : s + n] = op[0].transpose(0, 1)
    return out


def _decode_attention(q, k_cache, v_cache, decode_blocks: list[DecodeBlocks], scale: float) -> torch.Tensor:
    """q: (D, h, hd) one token per request -> (D, h, hd), with a softmax segmented by request."""
    d, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    # Row D is a dummy request for blocks nobody reads; its (NaN) results are dropped at the end.
    qd = torch.cat([q.view(d, num_kv_heads, group, head_dim), q.new_zeros(1, num_kv_heads, group, head_dim)])
    parts = []
    for blocks in decode_blocks:
        if blocks.block_start is not None:
            kb = k_cache[blocks.block_start : blocks.block_start + len(blocks.owner)]  # (R, kvh, bs, hd) view
            vb = v_cache[blocks.block_start : blocks.block_start + len(blocks.owner)]
        else:
            kb = torch.index_select(k_cache, 0, blocks.block_ids, out=blocks.buffers[0])
            vb = torch.index_select(v_cache, 0, blocks.block_ids, out=blocks.buffers[1])
        scores = torch.matmul(qd[blocks.owner], kb.transpose(-1, -2)).mul_(scale)  # (R, kvh, g, bs)
        scores.masked_fill_(~blocks.valid[:, None, None, :], float("-inf"))
        parts.append((scores, vb, blocks.owner))
    row_max = torch.full((d + 1, num_kv_heads, group), float("-inf"), device=q.device, dtype=q.dtype)
    for scores, _, owner in parts:
        block_max = scores.amax(dim=-1)  # (R, kvh, g)
        row_max.scatter_reduce_(0, owner[:, None, None].expand_as(block_max), block_max, reduce="amax")
    denom = torch.zeros_like(row_max)
    acc = q.new_zeros(d + 1, num_kv_heads, group, head_dim)
    for scores, vb, owner in parts:
        weights = scores.sub_(row_max[owner][..., None]).exp_()  # in place: scores is not read again
        denom.index_add_(0, owner, weights.sum(dim=-1))
        acc.index_add_(0, owner, torch.matmul(weights, vb))  # sum over each request's blocks
    return (acc[:d] / denom[:d, ..., None]).reshape(d, num_heads, head_dim)
