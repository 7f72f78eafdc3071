"""Prefix-aware routing (clusterft/serve/router.py): the index on its own, then a real Serve app with 2
engine replicas over HTTP, where each replica's prompt tokens looked up in its prefix cache (/metrics,
per replica) show where requests went."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clusterft.serve.router import PrefixIndex, block_hashes
from tests.serve.conftest import make_spec, running_app

BLOCK = 16


def test_block_hashes_name_whole_prefixes_per_model():
    a = block_hashes("m", list(range(40)), BLOCK)
    assert len(a) == 2  # the partial third block is not cached by the engine, so not routed on
    assert block_hashes("m", list(range(32)) + [99] * 8, BLOCK) == a
    assert block_hashes("m", [5, *list(range(1, 40))], BLOCK)[1] != a[1]  # block 1 carries block 0
    assert block_hashes("lora", list(range(40)), BLOCK) != a  # an adapter's KV is its own


def test_prefix_index_finds_the_longest_live_prefix_and_forgets_oldest():
    index = PrefixIndex(max_blocks=4)
    long, short = block_hashes("m", list(range(64)), BLOCK), block_hashes("m", list(range(16)), BLOCK)
    index.record(long, "r1")
    index.record(short, "r2")  # r2 computed block 0 since; r1 still holds all four
    assert index.longest_match(long, {"r1", "r2"}) == ("r1", 4)
    assert index.longest_match(long, {"r2"}) == ("r2", 1)  # r1 gone: the next best live replica
    assert index.longest_match(block_hashes("m", [7] * 32, BLOCK), {"r1", "r2"}) == (None, 0)
    index.record(block_hashes("m", [7] * 32, BLOCK), "r2")
    assert len(index) == 4  # the two least recently used blocks went: r1's blocks 1 and 2
    assert index.longest_match(long[:3], {"r1"}) == (None, 0)
    assert index.longest_match(long, {"r1"}) == ("r1", 4)  # block 3's hash still names all four


def replica_queries(url: str) -> dict[str, float]:
    """Prompt tokens each engine replica looked up in its prefix cache (every admitted prompt's)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "clusterft_replica_prefix_cache_queries":
            return {s.labels["replica"]: s.value for s in family.samples if s.name.endswith("_total")}
    return {}


def settled_queries(url: str, expected_total: float) -> dict[str, float]:
    """Per-replica queries once the replicas' stats (sent every 0.2 s) add up to `expected_total`."""
    deadline = time.monotonic() + 20
    while True:
        queries = replica_queries(url)
        if (len(queries) == 2 and sum(queries.values()) >= expected_total) or time.monotonic() > deadline:
            return queries
        time.sleep(0.2)


async def complete(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    r = await client.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_same_prefix_lands_on_one_replica_until_load_is_imbalanced(tiny_llama):
    system = [11 + i % 50 for i in range(4 * BLOCK)]  # a 4-block "system prompt"
    prompts = [[*system, 60 + u, 61 + u, 62 + u] for u in range(24)]
    spec = make_spec(tiny_llama, num_replicas=2, routing_imbalance_threshold=2)
    with running_app(spec) as url:
        before = settled_queries(url, 0)
        assert len(before) == 2, f"expected 2 engine replicas in /metrics, got {before}"

        async def sequential() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                for prompt in prompts[:8]:
                    await complete(client, url, prompt, 4)

        asyncio.run(sequential())
        total = sum(before.values()) + sum(len(p) for p in prompts[:8])
        after = settled_queries(url, total)
        grew = {r for r in after if after[r] > before[r]}
        # Serve's power of two choices spreads 8 requests on idle replicas (all on one: p = 1/128)
        assert len(grew) == 1, f"same-prefix requests went to {len(grew)} replicas: {before} -> {after}"
        (owner,) = grew
        other = next(r for r in after if r != owner)

        async def burst() -> None:  # 16 at once, long enough to stay in flight while routed
            async with httpx.AsyncClient(timeout=120) as client:
                await asyncio.gather(*(complete(client, url, p, 48) for p in prompts[8:]))

        asyncio.run(burst())
        total += sum(len(p) for p in prompts[8:])
        final = settled_queries(url, total)
        # More than 2 requests in flight on the owner: the router sends the rest by load
        assert final[other] > after[other], f"no fallback under imbalance: {after} -> {final}"
        assert final[owner] > after[owner], f"the owner got none of the burst: {after} -> {final}"
