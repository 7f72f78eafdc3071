from clusterft.engine.kv_cache_manager import KVCacheManager
from tests.engine.helpers import make_request


def test_allocate_slots_on_demand_and_none_when_full():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=4)
    r = make_request("a", 6)
    assert [b.block_id for b in kv.allocate_slots(r, 6)] == [0, 1]
    r.num_computed_tokens = 6
    assert kv.allocate_slots(r, 1) == []  # slot 6 is in block 1
    r.num_computed_tokens = 8
    assert [b.block_id for b in kv.allocate_slots(r, 1)] == [2]
    r2 = make_request("b", 8)
    assert kv.allocate_slots(r2, 8) is None  # 2 blocks needed, 1 free: nothing changes
    assert kv.block_pool.num_free_blocks == 1 and "b" in kv.req_to_blocks and kv.req_to_blocks["b"] == []
    kv.free(r)  # block 0 holds a cached (full prompt) block: evicted last; 1 and 2 are reused first
    assert kv.block_pool.free_block_queue.block_ids() == [1, 2, 3, 0]


def test_prefix_hit_keeps_last_token_to_compute_and_counts_free_cached_blocks():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=8)
    a = make_request("a", token_ids=list(range(12)))
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    kv.free(a)  # all three blocks cached and free
    b = make_request("b", token_ids=list(range(12)))
    blocks, num = kv.get_computed_blocks(b)
    assert [x.block_id for x in blocks] == [0, 1] and num == 8  # block 2 would leave nothing to compute
    c = make_request("c", token_ids=[*range(8), 99, 98, 97, 96, 95])
    blocks, num = kv.get_computed_blocks(c)
    assert [x.block_id for x in blocks] == [0, 1] and num == 8
    new = kv.allocate_slots(c, 5, blocks)
    assert [x.block_id for x in new] == [3, 4]  # 0, 1 taken back from the free list; 2 stays cached
    assert [x.ref_cnt for x in blocks] == [1, 1]
    assert kv.block_pool.free_block_queue.block_ids() == [5, 6, 7, 2]


def test_extra_keys_lora_and_weight_version_separate_caches():
    """An adapter's blocks are keyed by its bytes' digest, not its name: another adapter under the
    same name misses them, the same adapter under another name hits them."""
    kv = KVCacheManager(block_size=4, num_gpu_blocks=8)
    a = make_request("a", token_ids=list(range(9)))
    kv.allocate_slots(a, 9)
    assert kv.get_computed_blocks(make_request("b", token_ids=list(range(9))))[1] == 8
    x1 = make_request("c", token_ids=list(range(9)), lora_name="x", lora_digest="d1")
    assert kv.get_computed_blocks(x1)[1] == 0
    kv.allocate_slots(x1, 9)
    assert (
        kv.get_computed_blocks(make_request("e", token_ids=list(range(9)), lora_name="x", lora_digest="d2"))[
            1
        ]
        == 0
    )
    assert (
        kv.get_computed_blocks(make_request("f", token_ids=list(range(9)), lora_name="y", lora_digest="d1"))[
            1
        ]
        == 8
    )
    kv.weight_version = 1
    assert kv.get_computed_blocks(make_request("d", token_ids=list(range(9))))[1] == 0


def test_fork_then_copy_on_write_of_the_shared_partial_block():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=8)
    parent = make_request("p", token_ids=list(range(6)))
    kv.allocate_slots(parent, 5)
    parent.num_computed_tokens = 5
    child = parent.fork("c", 1)
    kv.fork(parent, child)
    assert [b.ref_cnt for b in kv.req_to_blocks["p"]] == [2, 2]
    changed = kv.allocate_slots(child, 1)  # writes slot 5, in shared block 1
    assert [b.block_id for b in changed] == [2]
    assert kv.take_blocks_to_copy() == [(1, 2)]
    assert kv.get_block_ids(child) == [0, 2] and kv.get_block_ids(parent) == [0, 1]
    assert [b.ref_cnt for b in kv.req_to_blocks["p"]] == [2, 1]
    assert kv.allocate_slots(parent, 1) == []  # now the only owner: writes in place
    assert kv.take_blocks_to_copy() == []


def test_swap_out_and_in_moves_blocks_between_pools():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=4, num_cpu_blocks=2)
    r = make_request("a", 6)
    kv.allocate_slots(r, 6)
    r.num_computed_tokens = 6
    assert kv.swap_out(r) == [(0, 0), (1, 1)]
    assert kv.block_pool.num_free_blocks == 4 and kv.cpu_block_pool.num_free_blocks == 0
    big = make_request("b", 12)
    kv.allocate_slots(big, 12)
    big.num_computed_tokens = 12
    assert kv.swap_out(big) is None  # 3 blocks, CPU pool has none free
    assert not kv.can_swap_in(r, 1)  # needs 2 of the 1 free device block
    kv.free(big)
    # big's first block duplicated cached block 0, so it stayed uncached: reused first.
    assert kv.block_pool.free_block_queue.block_ids() == [1, 0, 3, 2]
    assert kv.swap_in(r) == [(0, 1), (1, 0)]
    assert kv.cpu_block_pool.num_free_blocks == 2


def test_compact_moves_the_highest_blocks_into_holes_and_keeps_their_hash():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=16)
    reqs = [make_request(name, token_ids=[10 * k + t for t in range(8)]) for k, name in enumerate("abcd")]
    for r in reqs:
        kv.allocate_slots(r, 8)  # a: 0 1, b: 2 3, c: 4 5, d: 6 7 (all full, so hashed)
        r.num_computed_tokens = 8
    kv.free(reqs[0])
    kv.free(reqs[1])  # holes 0-3 below c and d; their hashes stay cached (free, reusable)
    assert kv.compact(["c", "d"], pinned=set()) == {}  # only hashed free blocks below: nothing to evict
    kv.reset_prefix_cache()  # holes 0-3 now cache nothing
    d_hash = kv.req_to_blocks["d"][1].block_hash
    assert d_hash is None  # reset: held blocks stay unregistered
    kv.block_pool.cache_full_block(kv.req_to_blocks["d"][1], 123, ("key",))
    moved = kv.compact(["c", "d"], pinned={6})  # block 6 gets this step's bytes: it stays
    assert moved == {"d": 1, "c": 0}
    assert kv.take_blocks_to_copy() == [(7, 0), (5, 1), (4, 2)]
    assert kv.get_block_ids(reqs[2]) == [2, 1] and kv.get_block_ids(reqs[3]) == [6, 0]
    assert kv.block_pool.get_cached_block(123, ("key",)).block_id == 0  # the hash moved with the bytes
    assert kv.block_pool.blocks[7].block_hash is None and kv.block_pool.blocks[7].ref_cnt == 0
    assert kv.block_pool.num_used_blocks == 4
    assert kv.compact(["c", "d"], pinned=set()) == {"d": 0}  # 6 -> 3: ids 0-3 in use, dense
    assert kv.compact(["c", "d"], pinned=set()) == {}
