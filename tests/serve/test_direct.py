"""ingress: direct (the engine deployment is the HTTP ingress) where it differs from the separate
ingress. The routes themselves (OpenAI conformance, auth, admin, streaming) run in both shapes in
test_openai_app.py, promotion under load in test_promotion_switch.py.

A SIGKILL of the engine replica under load, on the real app (127.0.0.1): the replica that dies is the
one holding the HTTP requests, so nothing is left to answer them in OpenAI's schema (the separate
ingress sends a 503, test_engine_replica_kill.py); Serve's proxy ends them. What must hold: every
request in flight ends at once (none hangs, none claims to have finished), and once Serve has replaced
the replica the app serves the same completions as before."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from clusterft.serve.spec import ServeSpec
from tests.serve.conftest import make_spec, offline_texts, running_app
from tests.serve.test_engine_replica_kill import LONG, engine_replica_pid


def test_direct_with_several_replicas_needs_pow2_routing(tiny_llama):
    """Serve's proxy picks the replica before any prompt is tokenized: prefix routing cannot work."""
    with pytest.raises(ValueError, match=r"cannot route by prompt prefix.*routing: pow2"):
        make_spec(tiny_llama, ingress="direct", num_replicas=2)
    autoscaled = {"min_replicas": 1, "max_replicas": 2}
    with pytest.raises(ValueError, match="cannot route by prompt prefix"):
        make_spec(tiny_llama, ingress="direct", autoscaling=autoscaled)
    assert make_spec(tiny_llama, ingress="direct", num_replicas=2, routing="pow2").ingress == "direct"
    assert make_spec(tiny_llama, ingress="direct").routing == "prefix"  # one replica: nothing to route
    assert ServeSpec.model_fields["ingress"].default == "separate"


async def stream_outcome(client: httpx.AsyncClient, body: dict, started: asyncio.Event) -> str:
    """How a long stream ended: "done" ([DONE] came), or why it did not."""
    try:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return "done"
                if line.startswith("data: "):
                    started.set()
        return "ended without [DONE]"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}"


async def outcomes_across_a_kill(url: str) -> tuple[list[str], str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = [asyncio.Event(), asyncio.Event()]
        streams = [
            asyncio.create_task(stream_outcome(client, {**LONG, "prompt": p}, e))
            for p, e in zip("ab", started, strict=True)
        ]
        plain = asyncio.create_task(client.post("/v1/completions", json={**LONG, "prompt": "c"}))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        await asyncio.sleep(0.3)  # the plain request is admitted meanwhile
        assert not plain.done(), "the non-streaming request ended before the kill"
        os.kill(engine_replica_pid(), signal.SIGKILL)
        killed = time.monotonic()
        stream_ends = await asyncio.gather(*streams)
        try:
            plain_end = f"HTTP {(await plain).status_code}"
        except httpx.HTTPError as exc:
            plain_end = type(exc).__name__
        return stream_ends, plain_end, time.monotonic() - killed


@pytest.mark.slow
def test_sigkilled_direct_engine_replica_ends_requests_in_flight_then_is_replaced(tiny_llama):
    spec = make_spec(tiny_llama, health_check_period_s=1, ingress="direct")
    with running_app(spec) as url:
        stream_ends, plain_end, ended_within_s = asyncio.run(outcomes_across_a_kill(url))
        print("direct ingress, replica killed:", stream_ends, plain_end, f"{ended_within_s:.2f} s")
        assert "done" not in stream_ends, "a stream claimed to finish on a replica that died"
        # Seen: both streams dropped (RemoteProtocolError), the plain request a 500 from the proxy.
        assert plain_end.startswith("HTTP 5") or not plain_end.startswith("HTTP"), plain_end
        assert ended_within_s < 30, "requests in flight hung after the replica died"

        [expected] = offline_texts(tiny_llama, ["the number 1 is"], 6)
        body = {"model": "tiny", "prompt": "the number 1 is", "max_tokens": 6, "temperature": 0}
        deadline, last = time.monotonic() + 180, None
        while True:
            try:
                r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
                if r.status_code == 200:
                    break
                assert r.status_code >= 500, r.text  # no replica yet: never a client error
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            assert time.monotonic() < deadline, f"Serve did not replace the engine replica; last: {last}"
            time.sleep(0.5)
        assert r.json()["choices"][0]["text"] == expected
