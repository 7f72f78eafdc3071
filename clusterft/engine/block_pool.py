"""BlockPool: fixed-size KV blocks, ref counts, an O(1) free list, and the prefix cache's hash map.

The pool never touches tensors: a block is an id into the cache engine's K/V tensors.

Free list order is eviction order; allocation pops the head. A freed block that holds a cached hash
joins the tail (a finished request frees its last block first, so a prefix outlives its tail) and
keeps its hash, so a later request with the same prefix can take it back ("touch") until it is
reused and its hash evicted: lazy LRU eviction of cached blocks. A freed block without a hash holds
nothing worth keeping: it goes to the head and is reused first, which also keeps the ids of the
blocks in use compact (decode attention reads a dense range of the cache in place).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...], extra_keys: tuple) -> int:
    """Chained hash of a full block: depends on every token before it and on the extra keys."""
    return hash((parent_hash, token_ids, extra_keys))


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    # What was hashed, kept to guard against hash collisions: (parent_hash, token_ids, extra_keys).
    hash_key: tuple | None = None
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)

    def reset_hash(self) -> None:
        self.block_hash = None
        self.hash_key = None


class FreeKVCacheBlockQueue:
    """Doubly linked list threaded through the blocks themselves: popleft, append, remove are O(1)."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        self.head.next_free, self.tail.prev_free = self.tail, self.head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self.head.next_free
        assert block is not self.tail, "no free blocks: callers check num_free_blocks first"
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, "block is not in the free list"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def appendleft(self, block: KVCacheBlock) -> None:
        first = self.head.next_free
        self.head.next_free, block.prev_free = block, self.head
        block.next_free, first.prev_free = first, block
        self.num_free_blocks += 1

    def append(self, block: KVCacheBlock) -> None:
        last = self.tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self.tail.prev_free = self.tail, block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Free block ids in eviction order (head first); for tests and debugging."""
        ids, block = [], self.head.next_free
        while block is not self.tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[int, KVCacheBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` from the head of the free list (evicting their cached hashes)."""
        assert num_blocks <= self.num_free_blocks, f"asked for {num_blocks} of {self.num_free_blocks} free"
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._maybe_evict_cached_block(block)
            assert block.ref_cnt == 0
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def _maybe_evict_cached_block(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None and self.uncache(block):
            self.num_evictions += 1

    def uncache(self, block: KVCacheBlock) -> bool:
        """Forget the block's hash: no lookup finds it any more. True if it was the cached one."""
        if block.block_hash is None:
            return False
        cached = self.cached_block_hash_to_block.get(block.block_hash) is block
        if cached:
            del self.cached_block_hash_to_block[block.block_hash]
        block.reset_hash()
        return cached

    def get_cached_block(self, block_hash: int, hash_key: tuple) -> KVCacheBlock | None:
        """The cached block for `block_hash`, if its hashed content really is `hash_key`."""
        block = self.cached_block_hash_to_block.get(block_hash)
        if block is None or block.hash_key != hash_key:  # a hash collision is a miss, never a wrong hit
            return None
        return block

    def cache_full_block(self, block: KVCacheBlock, block_hash: int, hash_key: tuple) -> None:
        """Register a full block under its hash (first writer wins; a duplicate stays uncached)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached_block_hash_to_block:
            return
        block.block_hash, block.hash_key = block_hash, hash_key
        self.cached_block_hash_to_block[block_hash] = block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on (possibly free, cached) blocks: a prefix-cache hit or a fork."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the free list: cached ones at the tail
        in the given order, uncached ones at the head (reused first)."""
        for block in ordered_blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_block_queue.appendleft(block)
                else:
                    self.free_block_queue.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (after a weight change, or to measure a cold cache)."""
        for block in self.cached_block_hash_to_block.values():
            block.reset_hash()
        self.cached_block_hash_to_block.clear()

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0
