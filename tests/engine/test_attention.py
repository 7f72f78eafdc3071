"""Paged decode attention equals plain attention over each request's contiguous context."""

import torch
import torch.nn.functional as F

from clusterft.engine.attention import DecodeBlocks, _decode_attention

BS, KVH, G, HD = 4, 2, 2, 8


def reference(q, k_cache, v_cache, tables, lens):
    outs = []
    for i, (table, n) in enumerate(zip(tables, lens, strict=True)):
        k = k_cache[table].transpose(0, 1).reshape(KVH, -1, HD)[:, :n]  # (kvh, n, hd)
        v = v_cache[table].transpose(0, 1).reshape(KVH, -1, HD)[:, :n]
        outs.append(
            F.scaled_dot_product_attention(q[i].view(KVH, G, HD), k, v, scale=0.3).reshape(KVH * G, HD)
        )
    return torch.stack(outs)


def blocks_for(tables, lens, d, in_place_start=None, num_range=0):
    """In place over [start, start + num_range) for first readers, gathered for the rest."""
    owner_r = torch.full((num_range,), d)
    valid_r = torch.zeros(num_range, BS, dtype=torch.bool)
    gathered = ([], [], [])
    seen = set()
    for i, (table, n) in enumerate(zip(tables, lens, strict=True)):
        for j, b in enumerate(table):
            valid = torch.arange(j * BS, (j + 1) * BS) < n
            if in_place_start is not None and b not in seen:
                owner_r[b - in_place_start], valid_r[b - in_place_start] = i, valid
            else:
                gathered[0].append(b), gathered[1].append(i), gathered[2].append(valid)
            seen.add(b)
    parts = [DecodeBlocks(owner_r, valid_r, block_start=in_place_start)] if in_place_start is not None else []
    if gathered[0]:
        num = len(gathered[0])
        buffers = (torch.empty(num, KVH, BS, HD), torch.empty(num, KVH, BS, HD))
        parts.append(
            DecodeBlocks(
                torch.tensor(gathered[1]), torch.stack(gathered[2]), None, torch.tensor(gathered[0]), buffers
            )
        )
    return parts


def test_in_place_and_gathered_blocks_equal_reference():
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(12, KVH, BS, HD), torch.randn(12, KVH, BS, HD)
    tables = [[3, 5, 4], [3, 7], [9]]  # block 3 is a prefix shared by requests 0 and 1
    lens = [10, 6, 1]
    q = torch.randn(3, KVH * G, HD)
    expected = reference(q, k_cache, v_cache, tables, lens)
    in_place = _decode_attention(q, k_cache, v_cache, blocks_for(tables, lens, 3, 3, 7), 0.3)
    gathered = _decode_attention(q, k_cache, v_cache, blocks_for(tables, lens, 3), 0.3)
    torch.testing.assert_close(in_place, expected)
    torch.testing.assert_close(gathered, expected)
