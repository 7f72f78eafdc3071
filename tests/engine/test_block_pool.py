from clusterft.engine import block_pool
from clusterft.engine.block_pool import BlockPool


def ids(blocks):
    return [b.block_id for b in blocks]


def test_allocation_pops_free_list_head_and_sets_ref_counts():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(3)
    assert ids(blocks) == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 3
    assert pool.free_block_queue.block_ids() == [3, 4, 5]


def test_free_puts_uncached_blocks_first_cached_last_and_touch_removes_from_free_list():
    pool = BlockPool(5)
    a = pool.get_new_blocks(5)
    pool.cache_full_block(a[0], 10, (None, (0,), ()))
    pool.cache_full_block(a[1], 11, (10, (1,), ()))
    pool.free_blocks(reversed(a[:3]))  # a request frees its tail first
    assert pool.free_block_queue.block_ids() == [2, 1, 0]  # 2 (uncached) reused first; 1 evicted before 0
    pool.free_blocks([a[4]])
    assert pool.free_block_queue.block_ids() == [4, 2, 1, 0]
    pool.free_blocks([a[3]])
    pool.touch([a[3]])
    assert a[3].ref_cnt == 1 and pool.free_block_queue.block_ids() == [4, 2, 1, 0]
    pool.touch([a[3]])  # shared: ref 2, never on the free list
    pool.free_blocks([a[3]])
    assert a[3].ref_cnt == 1 and pool.num_free_blocks == 4


def test_cached_free_blocks_are_evicted_lazily_in_lru_order():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    for i, b in enumerate(blocks):
        pool.cache_full_block(b, 100 + i, (None, (i,), ()))
    pool.free_blocks([blocks[2], blocks[0], blocks[1]])
    # Still cached while free.
    assert pool.get_cached_block(100, (None, (0,), ())) is blocks[0]
    [reused] = pool.get_new_blocks(1)
    assert reused is blocks[2] and reused.block_hash is None
    assert pool.get_cached_block(102, (None, (2,), ())) is None
    assert set(pool.cached_block_hash_to_block) == {100, 101}
    assert pool.num_evictions == 1


def test_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(block_pool, "hash_block_tokens", lambda *a: 7)
    pool = BlockPool(2)
    [b] = pool.get_new_blocks(1)
    pool.cache_full_block(b, block_pool.hash_block_tokens(None, (1, 2), ()), (None, (1, 2), ()))
    assert pool.get_cached_block(7, (None, (1, 2), ())) is b
    assert pool.get_cached_block(7, (None, (3, 4), ())) is None


def test_reset_prefix_cache_forgets_hashes():
    pool = BlockPool(2)
    [b] = pool.get_new_blocks(1)
    pool.cache_full_block(b, 5, (None, (1,), ()))
    pool.reset_prefix_cache()
    assert b.block_hash is None and not pool.cached_block_hash_to_block
