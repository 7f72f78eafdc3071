"""Paged attention, torch reference path: K/V live in blocks, reached through block tables.

A step's batch is flattened to T tokens. The first `num_decodes` tokens are single-token decode
queries (one per request); the rest are prefill chunks, one contiguous run per request.

    tokens: | d0 | d1 | d2 | p0 p0 p0 p0 p0 | p1 p1 p1 |
    slot = block_table[pos // block_size] * block_size + pos % block_size

A layer's cache is (num_blocks, kvh, block_size, hd): each block holds, per KV head, a contiguous
(block_size, hd) matrix. Each layer first writes the step's new K/V, then reads. Decodes are done
block-wise for the whole batch at once, without padding every request to the longest context:
scores of each (request, block) pair by one batched matmul, a softmax segmented by request (max and
sum reduced over each request's blocks), and the weighted V summed back per request. Where the
decodes' blocks fill most of a range of block ids, the matmuls read the cache in place; copying
blocks out first cost as much as the attention itself on CPU. Each prefill
chunk attends over its cached prefix plus itself, causally, with SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots) -> None:
    """k_cache, v_cache: (num_blocks, kvh, block_size, hd); k, v: (T, kvh, hd)."""
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
    if d:
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
        scores = torch.matmul(qd[blocks.owner], kb.transpose(-1, -2)) * scale  # (R, kvh, g, bs)
        scores = scores.masked_fill(~blocks.valid[:, None, None, :], float("-inf"))
        parts.append((scores, vb, blocks.owner))
    row_max = torch.full((d + 1, num_kv_heads, group), float("-inf"), device=q.device, dtype=q.dtype)
    for scores, _, owner in parts:
        block_max = scores.amax(dim=-1)  # (R, kvh, g)
        row_max.scatter_reduce_(0, owner[:, None, None].expand_as(block_max), block_max, reduce="amax")
    denom = torch.zeros_like(row_max)
    acc = q.new_zeros(d + 1, num_kv_heads, group, head_dim)
    for scores, vb, owner in parts:
        weights = torch.exp(scores - row_max[owner][..., None])
        denom.index_add_(0, owner, weights.sum(dim=-1))
        acc.index_add_(0, owner, torch.matmul(weights, vb))  # sum over each request's blocks
    return (acc[:d] / denom[:d, ..., None]).reshape(d, num_heads, head_dim)
