"""Paged attention, torch reference path: K/V live in blocks, reached through block tables.

A step's batch is flattened to T tokens. The first `num_decodes` tokens are single-token decode
queries (one per request); the rest are prefill chunks, one contiguous run per request.

    tokens: | d0 | d1 | d2 | p0 p0 p0 p0 p0 | p1 p1 p1 |
    slot = block_table[pos // block_size] * block_size + pos % block_size

A layer's cache is (num_blocks, kvh, block_size, hd): each block holds, per KV head, a contiguous
(block_size, hd) matrix. Each layer first writes the step's new K/V, then reads. Decodes are done
block-wise for the whole batch at once, without padding every request to the longest context:
scores of each (request, block) pair by one batched matmul, a softmax segmented by request (max and
sum reduced over each request's blocks), and the weighted V summed back per request. Each prefill
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
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    num_decodes: int
    decode_block_ids: torch.Tensor | None  # (TB,) all decodes' block tables, concatenated
    decode_block_owner: torch.Tensor | None  # (TB,) which decode (0..D-1) each of those blocks serves
    decode_block_valid: torch.Tensor | None  # (TB, block_size) True where the slot is in the context
    # (TB, kvh, bs, hd) scratch for the gathered K and V blocks, reused across layers and steps:
    # a fresh tensor this large costs more in page faults than the copy itself.
    decode_kv_buffers: tuple[torch.Tensor, torch.Tensor] | None
    prefills: list[PrefillChunk]


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
    k_cache: torch.Tensor,  # (num_blocks, block_size, kvh, hd)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # (T, h, hd)
    _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        owner = meta.decode_block_owner
        k_buf, v_buf = meta.decode_kv_buffers
        kb = torch.index_select(k_cache, 0, meta.decode_block_ids, out=k_buf)  # (TB, kvh, bs, hd)
        vb = torch.index_select(v_cache, 0, meta.decode_block_ids, out=v_buf)
        qb = q[:d].view(d, num_kv_heads, group, head_dim)[owner]  # (TB, kvh, g, hd): g heads share a KV head
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # (TB, kvh, g, bs)
        scores = scores.masked_fill(~meta.decode_block_valid[:, None, None, :], float("-inf"))
        block_max = scores.amax(dim=-1)  # (TB, kvh, g)
        row_max = torch.full((d, num_kv_heads, group), float("-inf"), device=q.device, dtype=q.dtype)
        row_max.scatter_reduce_(0, owner[:, None, None].expand_as(block_max), block_max, reduce="amax")
        weights = torch.exp(scores - row_max[owner][..., None])
        denom = torch.zeros_like(row_max).index_add_(0, owner, weights.sum(dim=-1))
        od = torch.zeros(d, num_kv_heads, group, head_dim, device=q.device, dtype=q.dtype)
        od.index_add_(0, owner, torch.matmul(weights, vb))  # sum over each request's blocks
        out[:d] = (od / denom[..., None]).view(d, num_heads, head_dim)
    for chunk in meta.prefills:
        s, n = chunk.query_start, chunk.query_len
        qp = q[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, h, n, hd)
        if chunk.context_block_ids is None:  # no cached prefix: plain causal attention over the chunk
            kp = k[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, kvh, n, hd)
            vp = v[s : s + n].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ctx = chunk.num_computed + n
            kp = k_cache[chunk.context_block_ids].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
            vp = v_cache[chunk.context_block_ids].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
            kp, vp = kp[None, :, :ctx], vp[None, :, :ctx]  # (1, kvh, ctx, hd)
            q_pos = torch.arange(chunk.num_computed, ctx, device=q.device)
            mask = (
                torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
            )  # (n, ctx): key j visible to i
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s : s + n] = op[0].transpose(0, 1)
    return out
