"""Paged attention, torch reference path: K/V live in blocks, reached through slot ids.

A step's batch is flattened to T tokens. The first `num_decodes` tokens are single-token decode
queries (one per request); the rest are prefill chunks, one contiguous run per request.

    tokens: | d0 | d1 | d2 | p0 p0 p0 p0 p0 | p1 p1 p1 |
    slot_mapping[t] = block_table[pos // block_size] * block_size + pos % block_size

Each layer first writes the step's new K/V into its slots, then reads: decodes gather their context
through a padded (D, L) slot table and run one batched SDPA; each prefill chunk attends over its
cached prefix (gathered) plus itself, causally.
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
    context_slots: torch.Tensor | None  # (num_computed + query_len,) slots; None when num_computed == 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    num_decodes: int
    decode_slots: torch.Tensor | None  # (D, L) context slots of each decode, padded
    decode_mask: torch.Tensor | None  # (D, 1, 1, L) True where a slot holds context
    prefills: list[PrefillChunk]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots) -> None:
    """k_cache, v_cache: (num_blocks, block_size, kvh, hd); k, v: (T, kvh, hd)."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)


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
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        qd = q[:d].view(d, num_kv_heads, group, head_dim)  # (D, kvh, g, hd): the g heads sharing a KV head
        kd = k_flat[meta.decode_slots].transpose(1, 2)  # (D, kvh, L, hd)
        vd = v_flat[meta.decode_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:d] = od.reshape(d, num_heads, head_dim)
    for chunk in meta.prefills:
        s, n = chunk.query_start, chunk.query_len
        qp = q[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, h, n, hd)
        if chunk.context_slots is None:  # no cached prefix: plain causal attention over the chunk
            kp = k[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, kvh, n, hd)
            vp = v[s : s + n].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kp = k_flat[chunk.context_slots].transpose(0, 1).unsqueeze(0)  # (1, kvh, ctx, hd)
            vp = v_flat[chunk.context_slots].transpose(0, 1).unsqueeze(0)
            ctx = kp.shape[2]
            q_pos = torch.arange(chunk.num_computed, chunk.num_computed + n)
            mask = torch.arange(ctx)[None, :] <= q_pos[:, None]  # (n, ctx): key j visible to query i
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s : s + n] = op[0].transpose(0, 1)
    return out
