"""SIGKILL of the engine deployment's replica process under load, on the real app (127.0.0.1): every
request in flight ends at once with OpenAI's error schema saying the replica died and to retry (a 503
with Retry-After, or an SSE error event and the end of the stream), and once Serve has replaced the
replica the app serves the same completions as before. /metrics counts those requests as 503s."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest

from tests.serve.conftest import make_spec, offline_texts, running_app

pytestmark = pytest.mark.slow

LONG = {"model": "tiny", "max_tokens": 200, "ignore_eos": True}
DIED = re.compile(r"engine replica died.*retry it")


def engine_replica_pid() -> int:
    import ray

    [name] = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::clusterft#engine#")
    ]
    replica = ray.get_actor(name, namespace="serve")
    return ray.get(replica.__ray_call__.remote(lambda _: os.getpid()), timeout=30)


async def stream_until_end(client: httpx.AsyncClient, path: str, body: dict, started: asyncio.Event):
    """POST a stream; returns its `data:` events (decoded) once it ends."""
    events = []
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                started.set()
    return events


async def requests_across_a_kill(url: str) -> tuple[list, list, httpx.Response, float]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = [asyncio.Event(), asyncio.Event()]
        streams = [
            asyncio.create_task(
                stream_until_end(client, "/v1/completions", {**LONG, "prompt": "a"}, started[0])
            ),
            asyncio.create_task(
                stream_until_end(
                    client,
                    "/v1/chat/completions",
                    {**LONG, "messages": [{"role": "user", "content": "b"}]},
                    started[1],
                )
            ),
        ]
        plain = asyncio.create_task(client.post("/v1/completions", json={**LONG, "prompt": "c"}))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        while (await client.get("/metrics")).text.count("clusterft_requests_running 3.0") == 0:
            assert not plain.done(), "the non-streaming request ended before the kill"
            await asyncio.sleep(0.05)
        os.kill(engine_replica_pid(), signal.SIGKILL)
        killed = time.monotonic()
        completion_events, chat_events = await asyncio.gather(*streams)
        response = await plain
        return completion_events, chat_events, response, time.monotonic() - killed


def test_sigkilled_engine_replica_fails_requests_in_flight_then_is_replaced(tiny_llama):
    spec = make_spec(tiny_llama, health_check_period_s=1)
    with running_app(spec) as url:
        completion_events, chat_events, response, failed_within_s = asyncio.run(requests_across_a_kill(url))

        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert DIED.search(error["message"]) and error["type"] == "ServiceUnavailableError"
        for events in (completion_events, chat_events):
            *tokens, failure, done = events
            assert tokens and all("choices" in e for e in tokens)  # it had been streaming
            assert DIED.search(failure["error"]["message"]) and failure["error"]["code"] == 503
            assert done == "[DONE]"
        assert failed_within_s < 30, "requests in flight hung after the replica died"

        # Serve starts a new replica (health check failed); until it serves, requests get 503s.
        [expected] = offline_texts(tiny_llama, ["the number 1 is"], 6)
        body = {"model": "tiny", "prompt": "the number 1 is", "max_tokens": 6, "temperature": 0}
        deadline, num_retries = time.monotonic() + 120, 0
        while (r := httpx.post(f"{url}/v1/completions", json=body, timeout=60)).status_code != 200:
            assert r.status_code == 503 and "retry" in r.json()["error"]["message"], r.text
            assert time.monotonic() < deadline, "Serve did not replace the engine replica"
            num_retries += 1
            time.sleep(0.5)
        assert r.json()["choices"][0]["text"] == expected

        # /metrics counts each request under how it ended: the two streams (sent as 200s) ended with
        # an error event, so they count as 503s, with the plain request and the retries.
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        counted = dict(re.findall(r'^clusterft_requests_total\{status="(\d+)"\} (\S+)$', metrics, re.M))
        assert counted == {"503": f"{3.0 + num_retries}", "200": "1.0"}, metrics
