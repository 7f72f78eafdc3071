"""Admin calls with two engine replicas on the real app (127.0.0.1): an adapter added or removed at
run time, and a reload, reach both replicas before the call returns, so every request after it sees
the change whichever replica Serve routes it to."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.serve.conftest import make_spec, offline_texts, running_app

pytestmark = pytest.mark.slow

PROMPT = "the number 3 is"
NUM_REQUESTS = 12  # routed at random over 2 replicas: all on one of them has odds 2 / 2**12


async def completions(url: str, model: str) -> list[httpx.Response]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/v1/completions", json=body) for _ in range(NUM_REQUESTS))
        )


def test_adapter_changes_and_reload_reach_every_replica(tiny_llama, tiny_adapter):
    spec = make_spec(
        tiny_llama, num_replicas=2, engine_num_cpus=0.25, adapter_roots=[str(tiny_adapter.parent)]
    )
    [expected] = offline_texts(tiny_llama, [PROMPT], 4, lora=("ada", tiny_adapter))
    with running_app(spec) as url:
        added = httpx.post(
            f"{url}/v1/admin/adapters", json={"name": "ada", "path": str(tiny_adapter)}, timeout=60
        )
        assert added.status_code == 201, added.text
        assert added.json()["num_replicas"] == 2
        responses = asyncio.run(completions(url, "ada"))
        assert [r.status_code for r in responses] == [200] * NUM_REQUESTS
        assert {r.json()["choices"][0]["text"] for r in responses} == {expected}

        missing = str(tiny_adapter.parent / "no-such-adapter")
        bad = httpx.post(f"{url}/v1/admin/adapters", json={"name": "bad", "path": missing}, timeout=60)
        assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
        assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} == {"tiny", "ada"}

        reload = httpx.post(f"{url}/v1/admin/reload", timeout=60)
        assert reload.status_code == 200 and reload.json()["num_replicas"] == 2
        assert reload.json()["error"] is None

        removed = httpx.delete(f"{url}/v1/admin/adapters/ada", timeout=60)
        assert removed.status_code == 200 and removed.json()["num_replicas"] == 2
        assert [r.status_code for r in asyncio.run(completions(url, "ada"))] == [404] * NUM_REQUESTS
        assert httpx.delete(f"{url}/v1/admin/adapters/ada", timeout=60).status_code == 404
