"""One engine replica that runs one request at a time (max_num_seqs 1), on the real app (127.0.0.1):
a request with `priority` (the admin's; vLLM's meaning: lower runs first) overtakes the low-priority
requests queued before it, a full queue answers 503, a client that goes away mid-stream is counted
as 499, and /metrics counts each request once under how it ended.

Deterministic on a loaded machine: the engine runs one request at a time, each queued request is seen
in /metrics' `clusterft_requests_waiting` before the next is sent, and the requests that must still
be queued when the high-priority one arrives run long (900 tokens, seconds) before them."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.serve.conftest import API_KEY, ENGINE, make_spec, running_app

pytestmark = pytest.mark.slow

ADMIN_KEY = "saturated-admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ONE_AT_A_TIME = ENGINE.model_copy(update={"max_num_seqs": 1, "max_model_len": 1024})
MAX_QUEUED = 4
LONG, SHORT = 900, 2  # tokens


@pytest.fixture(scope="module")
def url(tiny_llama):
    spec = make_spec(
        tiny_llama,
        engine=ONE_AT_A_TIME,
        api_key=API_KEY,
        admin_api_key=ADMIN_KEY,
        max_queued_requests=MAX_QUEUED,
    )
    with running_app(spec) as base:
        yield base


def body(max_tokens: int, **extra) -> dict:
    return {"model": "tiny", "prompt": "the number 1", "max_tokens": max_tokens, "ignore_eos": True, **extra}


async def metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics", headers=AUTH)).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def until(client: httpx.AsyncClient, name: str, value: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while await metric(client, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.02)


async def overtake(url: str) -> list[str]:
    """L0 runs; L1 and L2 queue (seen queued one by one); then H, with priority. The order in which
    they finish."""
    finished: list[str] = []

    async def send(name: str, payload: dict, headers: dict) -> None:
        r = await client.post("/v1/completions", json=payload, headers=headers)
        assert r.status_code == 200, r.text
        finished.append(name)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        tasks = [asyncio.create_task(send("L0", body(LONG), AUTH))]
        await until(client, "clusterft_requests_running", 1)
        for i, (name, max_tokens) in enumerate((("L1", LONG), ("L2", SHORT)), start=1):
            tasks.append(asyncio.create_task(send(name, body(max_tokens), AUTH)))
            await until(client, "clusterft_requests_waiting", i)
        tasks.append(asyncio.create_task(send("H", body(SHORT, priority=-10), ADMIN)))
        await asyncio.gather(*tasks)
    return finished


def test_priority_overtakes_the_queue_full_queue_is_503_and_every_ending_is_counted(url):
    order = asyncio.run(overtake(url))
    print("finish order:", order)
    # H arrived while L1 and L2 waited behind L0 (or, at worst, L1 had just started): it runs next.
    assert order.index("H") < order.index("L2") and set(order[: order.index("H")]) <= {"L0", "L1"}, order

    async def overload() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            tasks = [asyncio.create_task(client.post("/v1/completions", json=body(LONG), headers=AUTH))]
            await until(client, "clusterft_requests_running", 1)
            for i in range(1, MAX_QUEUED + 1):
                tasks.append(
                    asyncio.create_task(client.post("/v1/completions", json=body(SHORT), headers=AUTH))
                )
                await until(client, "clusterft_requests_waiting", i)
            refused = await client.post("/v1/completions", json=body(SHORT), headers=AUTH)
            assert [r.status_code for r in await asyncio.gather(*tasks)] == [200] * (MAX_QUEUED + 1)
            return refused

    refused = asyncio.run(overload())
    assert refused.status_code == 503 and "overloaded" in refused.json()["error"]["message"], refused.text

    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body(LONG, stream=True), headers=AUTH, timeout=60
    ) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
    # The client left mid-stream: the request ends (499, nginx's "client closed request"), and frees
    # the engine for the next one.
    counted: dict[str, str] = {}
    deadline = time.monotonic() + 30
    while counted.get("499") is None:
        assert time.monotonic() < deadline, f"the abandoned stream was never counted: {counted}"
        text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
        counted = dict(re.findall(r'^clusterft_requests_total\{status="(\d+)"\} (\S+)$', text, re.M))
        time.sleep(0.1)
    assert counted == {"200": "9.0", "503": "1.0", "499": "1.0"}, counted
