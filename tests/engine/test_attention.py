"""Paged decode attention equals plain attention over each request's contiguous context."""

import random

import torch
import torch.nn.functional as F

from clusterft.engine.attention import (
    MAX_IDLE_BLOCKS,
    MAX_IN_PLACE_RANGES,
    DecodeBlocks,
    _decode_attention,
    plan_decode_blocks,
)

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


def scratch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(n, KVH, BS, HD), torch.empty(n, KVH, BS, HD)


def test_plan_reads_far_apart_blocks_in_place_and_gathers_only_shared_ones():
    """Blocks in two clusters with a long idle run between them: two in-place ranges (the idle run is
    skipped, not read), and only the second reader of a shared prefix block is gathered."""
    torch.manual_seed(0)
    far = 10 + MAX_IDLE_BLOCKS + 5
    k_cache, v_cache = torch.randn(far + 8, KVH, BS, HD), torch.randn(far + 8, KVH, BS, HD)
    tables = [[10, 12, far + 1], [10, far + 3], [11], [far]]  # block 10 is shared by requests 0 and 1
    lens = [3 * BS - 1, BS + 2, 1, BS]
    parts = plan_decode_blocks(tables, torch.tensor(lens), BS, None, torch.device("cpu"), scratch)
    in_place = [(p.block_start, len(p.owner)) for p in parts if p.block_start is not None]
    assert in_place == [(10, 3), (far, 4)]
    gathered = [p for p in parts if p.block_start is None]
    assert len(gathered) == 1 and gathered[0].block_ids.tolist() == [10]
    assert gathered[0].owner.tolist() == [1]
    q = torch.randn(4, KVH * G, HD)
    out = _decode_attention(q, k_cache, v_cache, parts, 0.3)
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, tables, lens))


def test_plan_on_random_layouts_equals_reference_with_few_ranges():
    """Scattered block tables (many clusters, shared prefixes, a sliding window off): at most
    MAX_IN_PLACE_RANGES in-place ranges, and the same attention as each request's contiguous context."""
    rng = random.Random(0)
    torch.manual_seed(1)
    num_blocks = 40 * MAX_IDLE_BLOCKS
    k_cache, v_cache = torch.randn(num_blocks, KVH, BS, HD), torch.randn(num_blocks, KVH, BS, HD)
    for _ in range(20):
        free = rng.sample(range(num_blocks), 60)
        tables, lens = [], []
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(1, 8)
            tables.append(free[:n])
            free = free[n:]
            lens.append(rng.randint((n - 1) * BS + 1, n * BS))
        if len(tables) > 1:  # a shared first block
            tables[1] = tables[0][:1] + tables[1]
            lens[1] += BS
        parts = plan_decode_blocks(tables, torch.tensor(lens), BS, None, torch.device("cpu"), scratch)
        assert sum(p.block_start is not None for p in parts) <= MAX_IN_PLACE_RANGES
        q = torch.randn(len(tables), KVH * G, HD)
        out = _decode_attention(q, k_cache, v_cache, parts, 0.3)
        torch.testing.assert_close(out, reference(q, k_cache, v_cache, tables, lens))
