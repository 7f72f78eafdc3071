"""Engine replicas scale on the engines' load (clusterft/serve/autoscaling.py): the policy's arithmetic,
then a real Serve app going 1 -> 2 -> 1 replicas under a bounded load over HTTP, losing no request."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from clusterft.serve.autoscaling import ENGINE_RUNNING, ENGINE_WAITING, KV_USAGE, desired_replicas
from clusterft.serve.spec import EngineAutoscaling
from tests.serve.conftest import make_spec, running_app


def test_desired_replicas_follow_requests_or_kv_whichever_is_higher():
    load = {ENGINE_RUNNING: {"a": 6.0, "b": 2.0}, ENGINE_WAITING: {"a": 4.0, "b": 0.0}, KV_USAGE: {"a": 0.2}}
    assert desired_replicas(load, 2, 4.0, 0.8) == 3.0  # 12 requests / 4 per replica
    full_kv = {**load, KV_USAGE: {"a": 0.9, "b": 0.9}}
    assert desired_replicas(full_kv, 2, 100.0, 0.6) == pytest.approx(3.0)  # 1.8 of KV / 0.6
    assert desired_replicas({}, 2, 4.0, 0.8) == 2  # nobody reported yet: stay


def test_spec_refuses_a_start_outside_the_bounds(tiny_llama):
    with pytest.raises(ValueError, match="num_replicas \\(3\\) is where autoscaling starts"):
        make_spec(tiny_llama, num_replicas=3, autoscaling=EngineAutoscaling(max_replicas=2))
    with pytest.raises(ValueError, match="min_replicas \\(3\\) is above max_replicas \\(2\\)"):
        EngineAutoscaling(min_replicas=3, max_replicas=2)


def test_spec_refuses_haproxy_open_on_every_interface(tiny_llama, monkeypatch):
    monkeypatch.delenv("CLUSTERFT_API_KEY", raising=False)
    with pytest.raises(ValueError, match="data_plane haproxy makes Ray Serve bind every interface"):
        make_spec(tiny_llama, data_plane="haproxy")
    assert make_spec(tiny_llama, data_plane="haproxy", api_key="k").data_plane == "haproxy"


def running_replicas() -> int:
    from ray import serve

    engine = serve.status().applications["clusterft"].deployments["engine"]
    return engine.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_scales_one_two_one_under_bounded_load_and_loses_no_request(tiny_llama):
    scaling = EngineAutoscaling(
        min_replicas=1,
        max_replicas=2,
        target_requests_per_replica=4,
        upscale_delay_s=0.5,
        downscale_delay_s=2,
        look_back_period_s=2,
        metrics_interval_s=0.5,
    )
    spec = make_spec(tiny_llama, autoscaling=scaling)
    results: list[tuple[int, int]] = []  # (status, completion tokens) of every request sent
    seen: list[int] = []  # running replicas, sampled

    async def client(url: str, stop: asyncio.Event, max_tokens: int) -> None:
        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": max_tokens, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=120) as http:
            while not stop.is_set():
                r = await http.post(f"{url}/v1/completions", json=body)
                tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                results.append((r.status_code, tokens))

    async def until(count: int, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while (n := await asyncio.to_thread(running_replicas)) != count:
            seen.append(n)
            assert time.monotonic() < deadline, f"never reached {count} replicas (saw {sorted(set(seen))})"
            await asyncio.sleep(0.5)
        seen.append(n)

    async def scenario(url: str) -> None:
        assert running_replicas() == 1
        burst, trickle = asyncio.Event(), asyncio.Event()
        # 12 at once is 3 replicas' worth at 4 each: Serve's bounds make it 2
        load = [asyncio.create_task(client(url, burst, 64)) for _ in range(12)]
        light = asyncio.create_task(client(url, trickle, 8))  # runs through both scalings
        await until(2, 40)
        burst.set()
        await asyncio.gather(*load)
        await until(1, 40)  # one request in flight: a quarter of a replica
        trickle.set()
        await light

    with running_app(spec) as url:
        asyncio.run(scenario(url))
    assert results, "no request was sent"
    lost = [r for r in results if r[0] != 200]
    assert not lost, f"{len(lost)} of {len(results)} requests failed: {lost[:3]}"
    assert all(tokens in (8, 64) for _, tokens in results), "a response was cut short"
