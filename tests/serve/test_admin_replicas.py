"""Admin calls with two engine replicas on the real app (127.0.0.1): an adapter added or removed at
run time, and a reload, reach both replicas before the call returns, so every request after it sees
the change whichever replica Serve routes it to. /metrics then shows both replicas' engines (each under
its `replica` label, and the app's totals) and every API request under the status it got."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """/metrics parsed by Prometheus' own parser: sample name -> {sorted label items: value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def per_replica(samples: dict[str, dict[tuple, float]], name: str) -> dict[str, float]:
    return {dict(labels)["replica"]: value for labels, value in samples[name].items()}


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
        invalid = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "n": 0})
        assert invalid.status_code == 400

        samples = scrape(url)
    # Both replicas served some of the 2 x 12 requests; the totals are their sums (one snapshot).
    assert samples["clusterft_engine_replicas"] == {(): 2.0}
    steps = per_replica(samples, "clusterft_replica_engine_steps_total")
    assert len(steps) == 2 and all(n > 0 for n in steps.values()), steps
    assert samples["clusterft_engine_steps_total"] == {(): sum(steps.values())}
    assert set(per_replica(samples, "clusterft_replica_requests_running")) == set(steps)
    assert samples["clusterft_kv_cache_blocks"] == {(): 2.0 * spec.engine.num_gpu_blocks}
    assert per_replica(samples, "clusterft_replica_model_version") == dict.fromkeys(steps, 0.0)
    # Every /v1 request under the status it got: 201 add, 12 + 1 + 1 + 1 200s (completions, models,
    # reload, delete), 400s (a refused adapter, n=0), 404s (12 completions of the removed adapter and
    # its second delete); /health polls and scrapes are not API requests.
    statuses = {dict(labels)["status"]: n for labels, n in samples["clusterft_requests_total"].items()}
    assert statuses == {"200": 15.0, "201": 1.0, "400": 2.0, "404": 13.0}
