"""Prefix-aware routing of engine requests across replicas (a Ray Serve `RequestRouter`).

A replica's engine keeps the KV blocks of the prompts it has served (its prefix cache); a request
sharing a prompt prefix with them only computes the rest. Serve's default router (power of two
choices) ignores that and spreads one system prompt over every replica, each computing it again.
This router sends `generate` calls to the replica that was last sent the longest matching prefix,
counted in the engine's own full KV blocks of token ids and keyed by the model (base or LoRA adapter:
an adapter's blocks are its own); with no prefix match, an adapter request goes to a replica where
that adapter is resident. It falls back to power of two choices when that replica has more than
`imbalance_threshold` requests more than the least loaded candidate, when nothing matches, and for
every other method (status, model_info).

The prefix index lives in the router, i.e. in each handle's process (the app's ingress replica): an
app with several ingress replicas has one index each, which only costs some hit rate. It is an LRU
bounded by `max_blocks` block hashes, and it forgets nothing when a replica goes away: an entry whose
replica is gone is simply never a candidate.

Replicas report their resident adapters with their routing stats (EngineDeployment.record_routing_stats,
every `request_routing_stats_period_s`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

ROUTED_METHOD = "generate"  # EngineDeployment.generate(request_id, prompt_token_ids, params, model, ...)
ROUTER_PATH = "clusterft.serve.router:PrefixAffinityRouter"


def block_hashes(model: str, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full `block_size` blocks of `token_ids` for `model`: hash i names the
    whole prefix up to block i, as the engine's prefix cache does (a partial last block is never
    cached there, so it is not counted here either)."""
    parent = hashlib.blake2b(model.encode(), digest_size=16).digest()
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = ",".join(map(str, token_ids[start : start + block_size])).encode()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Block hash -> the replica last sent that prefix; least recently used beyond `max_blocks`."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._owner: OrderedDict[bytes, ReplicaID] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def longest_match(
        self, hashes: Sequence[bytes], candidates: set[ReplicaID]
    ) -> tuple[ReplicaID | None, int]:
        """The candidate holding the longest prefix of `hashes` and how many blocks it holds. The
        owner of block i also computed blocks 0..i-1, so the deepest known block decides."""
        for depth in range(len(hashes), 0, -1):
            owner = self._owner.get(hashes[depth - 1])
            if owner is not None and owner in candidates:
                return owner, depth
        return None, 0

    def record(self, hashes: Sequence[bytes], replica: ReplicaID) -> None:
        for key in hashes:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_blocks:
            self._owner.popitem(last=False)


def routed_request(pending: PendingRequest) -> tuple[str, list[int]] | None:
    """(model, prompt token ids) of a `generate` call, else None (other methods route by load)."""
    if pending.metadata.call_method != ROUTED_METHOD:
        return None
    args = list(pending.args)
    token_ids = pending.kwargs.get("prompt_token_ids", args[1] if len(args) > 1 else None)
    model = pending.kwargs.get("model", args[3] if len(args) > 3 else None)
    if not isinstance(token_ids, list) or not isinstance(model, str):
        return None
    return model, token_ids


class PrefixAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Prefix (and adapter) affinity first, power of two choices under imbalance; see the module."""

    def initialize_state(
        self, block_size: int = 16, imbalance_threshold: int = 8, max_blocks: int = 1 << 16, **_: Any
    ) -> None:
        if block_size < 1 or imbalance_threshold < 0 or max_blocks < 1:
            raise ValueError(
                f"PrefixAffinityRouter: block_size ({block_size}) and max_blocks ({max_blocks}) must be "
                f">= 1 and imbalance_threshold ({imbalance_threshold}) >= 0"
            )
        self.block_size = block_size
        self.imbalance_threshold = imbalance_threshold
        self.index = PrefixIndex(max_blocks)
        self.num_affinity_routed = 0  # for tests and logs: requests sent by prefix or adapter
        self.num_fallbacks = 0  # requests with a preferred replica that load sent elsewhere

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        request = routed_request(pending_request) if pending_request is not None else None
        if request is None or len(candidate_replicas) < 2:
            return await super().choose_replicas(candidate_replicas, pending_request)
        model, token_ids = request
        by_id = {r.replica_id: r for r in candidate_replicas}
        preferred, _ = self.index.longest_match(block_hashes(model, token_ids, self.block_size), set(by_id))
        if preferred is None:
            preferred = self._adapter_home(model, candidate_replicas)
        if preferred is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        if await self._overloaded(by_id[preferred], candidate_replicas):
            self.num_fallbacks += 1
            return await super().choose_replicas(candidate_replicas, pending_request)
        self.num_affinity_routed += 1
        return [[by_id[preferred]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = routed_request(pending_request)
        if request is not None:
            model, token_ids = request
            self.index.record(block_hashes(model, token_ids, self.block_size), replica_id)

    def _adapter_home(self, model: str, candidates: list[RunningReplica]) -> ReplicaID | None:
        """The least loaded candidate with adapter `model` resident (None for the base model, or
        when it is resident nowhere or everywhere: then there is nothing to prefer)."""
        homes = [r for r in candidates if model in (r.routing_stats or {}).get("resident_adapters", ())]
        if not homes or len(homes) == len(candidates):
            return None
        return min(homes, key=lambda r: self._queue_len(r.replica_id) or 0).replica_id

    def _queue_len(self, replica: ReplicaID) -> int | None:
        return self._replica_queue_len_cache.get(replica)

    async def _overloaded(self, preferred: RunningReplica, candidates: list[RunningReplica]) -> bool:
        """Whether `preferred` has more than imbalance_threshold requests beyond the least loaded
        candidate (queue lengths from Serve's cache, probed where it has none)."""
        lens = {r.replica_id: self._queue_len(r.replica_id) for r in candidates}
        missing = [r for r in candidates if lens[r.replica_id] is None]
        if missing:
            for replica, queue_len in await self._probe_queue_lens(missing, 0):
                lens[replica.replica_id] = queue_len
        known = [n for n in lens.values() if n is not None]
        mine = lens[preferred.replica_id]
        if mine is None or not known:
            return mine is None  # an unreachable preferred replica is not waited for
        return mine - min(known) > self.imbalance_threshold
