"""KVCacheManager: which blocks each request holds; prefix lookup; copy-on-write; swap to CPU.

It decides block ids only; the cache engine (in each worker) moves the bytes. Copies and swaps decided
here are drained by the scheduler into the step's SchedulerOutput.
"""

from __future__ import annotations

from clusterft.engine.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from clusterft.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int = 0, enable_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_gpu_blocks, enable_caching)
        self.cpu_block_pool = BlockPool(num_cpu_blocks, enable_caching=False)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_cpu_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_block: dict[str, int] = {}  # leading blocks of a request already registered
        self.weight_version = 0  # part of every block hash: new weights never hit old KV
        self.blocks_to_copy: list[tuple[int, int]] = []  # (src, dst) copy-on-write, drained each step
        self.prefix_cache_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_cache_hits = 0  # of which found there
        self.num_compaction_moves = 0  # blocks moved down into holes (compact)

    # ---- hashing -------------------------------------------------------------------------------
    def _hash_key(self, request: Request, i: int) -> tuple:
        bs = self.block_size
        parent = request.block_hashes[i - 1] if i else None
        return (
            parent,
            tuple(request.all_token_ids[i * bs : (i + 1) * bs]),
            (request.lora_digest, self.weight_version),
        )

    def _update_block_hashes(self, request: Request, num_tokens: int) -> None:
        for i in range(len(request.block_hashes), num_tokens // self.block_size):
            parent, token_ids, extra_keys = self._hash_key(request, i)
            request.block_hashes.append(hash_block_tokens(parent, token_ids, extra_keys))

    def _cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's blocks that `num_tokens` fill completely."""
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_cached_block.get(request.request_id, 0)
        if not self.enable_caching or num_full <= start:
            return
        self._update_block_hashes(request, num_full * self.block_size)
        blocks = self.req_to_blocks[request.request_id]
        for i in range(start, num_full):
            self.block_pool.cache_full_block(blocks[i], request.block_hashes[i], self._hash_key(request, i))
        self.num_cached_block[request.request_id] = num_full

    # ---- allocation ----------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request, max_cached_tokens: int | None = None):
        """Longest cached prefix of `request` as (blocks, num_tokens); its last token is always left
        to compute so that its logits exist."""
        if not self.enable_caching:
            return [], 0
        limit = request.num_tokens - 1 if max_cached_tokens is None else max_cached_tokens
        max_blocks = max(limit, 0) // self.block_size
        self._update_block_hashes(request, max_blocks * self.block_size)
        blocks: list[KVCacheBlock] = []
        for i in range(max_blocks):
            block = self.block_pool.get_cached_block(request.block_hashes[i], self._hash_key(request, i))
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVCacheBlock] = ()
    ) -> list[KVCacheBlock] | None:
        """Blocks for `num_new_tokens` more tokens of `request`, or None if they do not fit (nothing
        changes then). Returns the tail of the block table that changed: a copy-on-write replacement
        of the shared last block, if any, then appended blocks."""
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(num_required - len(req_blocks) - len(new_computed_blocks), 0)
        # A block shared with a fork that this request is about to write into must be copied first.
        write_idx = num_computed // self.block_size
        cow = num_new_tokens > 0 and write_idx < len(req_blocks) and req_blocks[write_idx].ref_cnt > 1
        assert not cow or write_idx == len(req_blocks) - 1, "only the last, partial block can be shared"
        num_evictable = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + cow > self.block_pool.num_free_blocks - num_evictable:
            return None
        if not req_blocks and request.num_computed_tokens == 0:
            # The request's first blocks: it is admitted, so its prefix lookup counts, once. A lookup
            # that did not fit is repeated next step and must not count again (vLLM #43736).
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size

        self.block_pool.touch(new_computed_blocks)
        req_blocks.extend(new_computed_blocks)
        changed: list[KVCacheBlock] = []
        if cow:
            shared = req_blocks[write_idx]
            [copy] = self.block_pool.get_new_blocks(1)
            self.blocks_to_copy.append((shared.block_id, copy.block_id))
            self.block_pool.free_blocks([shared])
            req_blocks[write_idx] = copy
            changed.append(copy)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        changed.extend(new_blocks)
        # Blocks are registered before their KV is written: a request scheduled later in the same step
        # may hit them, which is safe because every layer writes KV before it reads.
        self._cache_blocks(request, num_computed + num_new_tokens)
        return changed

    def fork(self, parent: Request, child: Request) -> None:
        """`child` shares all of `parent`'s blocks (one more reference each)."""
        blocks = list(self.req_to_blocks.get(parent.request_id, []))
        self.block_pool.touch(blocks)
        self.req_to_blocks[child.request_id] = blocks
        self.num_cached_block[child.request_id] = self.num_cached_block.get(parent.request_id, 0)

    def free(self, request: Request) -> None:
        """Return the request's blocks; its tail is freed first so that it is evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        self.cpu_block_pool.free_blocks(reversed(self.req_to_cpu_blocks.pop(request.request_id, [])))
        self.num_cached_block.pop(request.request_id, None)

    def uncache_blocks(self, request: Request, from_token: int) -> None:
        """Take the request's blocks holding token `from_token` and later out of the prefix cache:
        their KV is not known to match their hashes (written by a step that failed the request)."""
        for block in self.req_to_blocks.get(request.request_id, [])[from_token // self.block_size :]:
            self.block_pool.uncache(block)

    def get_block_ids(self, request: Request) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request.request_id, [])]

    # ---- compaction ----------------------------------------------------------------------------
    def compact(self, request_ids, pinned: set[int], max_moves: int = 64) -> dict[str, int]:
        """Keep the block ids in use dense: when less than 80% of [0, highest id held) is in use, move
        up to `max_moves` of the highest blocks held by one request only (ref count 1, not in
        `pinned`: blocks whose bytes arrive this step) into the lowest free blocks that cache nothing.
        Decode attention reads ranges of ids in place (attention.plan_decode_blocks), idle blocks
        inside them included; finished requests leave holes. Queues (src, dst) copies; a moved
        block's prefix-cache hash moves with it. Returns {request id: first index of its block table
        that changed}."""
        pool = self.block_pool
        held = [
            (block.block_id, req_id, i)
            for req_id in request_ids
            for i, block in enumerate(self.req_to_blocks.get(req_id, ()))
            if block.ref_cnt == 1 and block.block_id not in pinned
        ]
        if not held:
            return {}
        top = max(held)[0] + 1
        if 5 * pool.num_used_blocks >= 4 * top:
            return {}
        held.sort(reverse=True)
        holes = (b for b in pool.blocks[:top] if b.ref_cnt == 0 and b.block_hash is None)
        moved: dict[str, int] = {}
        for (src_id, req_id, i), dst in zip(held[:max_moves], holes, strict=False):  # holes may run out
            if dst.block_id >= src_id:
                break
            table = self.req_to_blocks[req_id]
            src = table[i]
            pool.free_block_queue.remove(dst)
            dst.ref_cnt = 1
            if src.block_hash is not None:
                if pool.cached_block_hash_to_block.get(src.block_hash) is src:
                    pool.cached_block_hash_to_block[src.block_hash] = dst
                dst.block_hash, dst.hash_key = src.block_hash, src.hash_key
                src.reset_hash()
            table[i] = dst
            pool.free_blocks([src])
            self.blocks_to_copy.append((src_id, dst.block_id))
            moved[req_id] = min(moved.get(req_id, i), i)
            self.num_compaction_moves += 1
        return moved

    # ---- swap ----------------------------------------------------------------------------------
    def swap_out(self, request: Request) -> list[tuple[int, int]] | None:
        """Move the request's blocks to the CPU pool: [(gpu_block_id, cpu_block_id)], or None if the
        CPU pool is too small (the caller recomputes instead)."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        if len(blocks) > self.cpu_block_pool.num_free_blocks:
            return None
        cpu_blocks = self.cpu_block_pool.get_new_blocks(len(blocks))
        mapping = [(g.block_id, c.block_id) for g, c in zip(blocks, cpu_blocks, strict=True)]
        self.free(request)
        self.req_to_cpu_blocks[request.request_id] = cpu_blocks
        return mapping

    def can_swap_in(self, request: Request, num_new_tokens: int) -> bool:
        needed = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return needed <= self.block_pool.num_free_blocks

    def swap_in(self, request: Request) -> list[tuple[int, int]]:
        """Bring a swapped request's blocks back: [(cpu_block_id, gpu_block_id)]."""
        cpu_blocks = self.req_to_cpu_blocks.pop(request.request_id)
        gpu_blocks = self.block_pool.get_new_blocks(len(cpu_blocks))
        self.req_to_blocks[request.request_id] = gpu_blocks
        self.cpu_block_pool.free_blocks(reversed(cpu_blocks))
        self._cache_blocks(request, request.num_computed_tokens)
        return [(c.block_id, g.block_id) for c, g in zip(cpu_blocks, gpu_blocks, strict=True)]

    # ---- stats ---------------------------------------------------------------------------------
    def take_blocks_to_copy(self) -> list[tuple[int, int]]:
        copies, self.blocks_to_copy = self.blocks_to_copy, []
        return copies

    def usage(self) -> float:
        return self.block_pool.usage()

    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()
        # Blocks held now stay unregistered: their KV may predate a weight change.
        for req_id in self.num_cached_block:
            self.num_cached_block[req_id] = len(self.req_to_blocks.get(req_id, []))
