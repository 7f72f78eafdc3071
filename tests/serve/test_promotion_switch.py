"""Promotion and rollback under load on real Ray + Serve (127.0.0.1): the app follows the registry's
`production` alias from v1 to v2 (alias poll) and back to v1 (rollback + POST /v1/admin/reload) while
4 clients (streaming and not) keep sending; no request fails and every answer equals the offline
engine of the version its header names. The replica's serving record says which version it serves
at every point."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from clusterft.registry.registry import Registry
from clusterft.registry.serving import read_records
from clusterft.serve.spec import RegistrySource, ServeSpec
from clusterft.serve.version_routes import MODEL_VERSION_HEADER
from tests.serve.conftest import ENGINE, free_port, offline_texts, running_app

pytestmark = pytest.mark.slow

PROMPTS = ["the number 1 is", "hello there", "a b c d", "once upon a time"]
MAX_TOKENS = 4
NUM_CLIENTS = 4


@dataclass
class Result:
    started: float
    ended: float
    prompt: int
    stream: bool
    status: int
    version: str | None
    text: str
    error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, prompt: int, stream: bool) -> Result:
    body = {"model": "quickstart", "prompt": PROMPTS[prompt], "max_tokens": MAX_TOKENS, "temperature": 0}
    started = time.monotonic()
    try:
        if not stream:
            r = await client.post(f"{url}/v1/completions", json=body)
            text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
            version = r.headers.get(MODEL_VERSION_HEADER)
            return Result(started, time.monotonic(), prompt, stream, r.status_code, version, text)
        async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            parts = []
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"error event: {event}")
                    parts.extend(c["text"] for c in event["choices"])
            version = r.headers.get(MODEL_VERSION_HEADER)
            return Result(started, time.monotonic(), prompt, stream, r.status_code, version, "".join(parts))
    except Exception as exc:  # a failed request: recorded, asserted on below
        return Result(started, time.monotonic(), prompt, stream, 0, None, "", repr(exc))


def load_loop(url: str, stop: threading.Event, results: list[Result]) -> None:
    """NUM_CLIENTS closed-loop clients until `stop`; client i alternates streaming and not."""

    async def client_task(i: int) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            n = 0
            while not stop.is_set():
                results.append(await one_request(client, url, (i + n) % len(PROMPTS), (i + n) % 2 == 0))
                n += 1

    async def main() -> None:
        await asyncio.gather(*(client_task(i) for i in range(NUM_CLIENTS)))

    asyncio.run(main())


def wait_for_version(results: list[Result], version: str, after: float, timeout_s: float = 60) -> Result:
    """The first response from `version` of a request sent after `after`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hits = [r for r in list(results) if r.version == version and r.started >= after]
        if hits:
            return min(hits, key=lambda r: r.ended)
        time.sleep(0.05)
    raise AssertionError(f"no response from {version} within {timeout_s}s")


def wait_for_record(registry: Registry, version: str, timeout_s: float = 10) -> float:
    """Seconds until the replica's serving record names `version` (it follows the switch)."""
    started = time.monotonic()
    while True:
        records = read_records(registry.root, "quickstart")
        if [r.version for r in records] == [version]:
            assert records[0].live(time.time()) and records[0].app == "clusterft"
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, records
        time.sleep(0.05)


@pytest.mark.parametrize("ingress", ["separate", "direct"])
def test_promote_and_rollback_under_load_lose_no_request(tmp_path, ingress):
    from clusterft.hf.tiny import make_tiny_model

    registry = Registry(tmp_path / "registry")
    for seed in (0, 1):
        model = make_tiny_model(tmp_path / f"seed{seed}", "llama", "tiny", seed=seed)
        registry.register("quickstart", model, kind="full")
    registry.promote("quickstart", "v1")
    versions = {v.version: v.path for v in registry.versions("quickstart")}
    expected = {v: offline_texts(path, PROMPTS, MAX_TOKENS) for v, path in versions.items()}
    assert expected["v0001"] != expected["v0002"], "the two versions must be told apart by their outputs"

    spec = ServeSpec(
        registry=RegistrySource(root=str(registry.root), model_name="quickstart", poll_interval_s=0.25),
        port=free_port(),
        engine=ENGINE,
        engine_num_cpus=0.5,
        worker_num_cpus=0.5,
        ingress_num_cpus=0.25,
        ingress=ingress,  # direct: the engine replica that switches versions is the HTTP ingress too
    )
    results: list[Result] = []
    stop = threading.Event()
    with running_app(spec) as url:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m["version"]) for m in models] == [("quickstart", "v0001")]
        wait_for_record(registry, "v0001")
        load = threading.Thread(target=load_loop, args=(url, stop, results))
        load.start()
        try:
            wait_for_version(results, "v0001", 0)
            time.sleep(1.0)  # steady state on v1

            promoted_at = time.monotonic()
            registry.promote("quickstart", "v2")  # the replica's alias poll sees it
            first_v2 = wait_for_version(results, "v0002", promoted_at)
            record_after_switch_s = wait_for_record(registry, "v0002")
            time.sleep(1.0)

            rolled_back_at = time.monotonic()
            registry.rollback("quickstart")
            reload = httpx.post(f"{url}/v1/admin/reload", timeout=60).json()  # no waiting for the poll
            first_v1 = wait_for_version(results, "v0001", rolled_back_at)
            wait_for_record(registry, "v0001")
            time.sleep(1.0)
        finally:
            stop.set()
            load.join(timeout=120)
        health = httpx.get(f"{url}/health").json()
    # serve.shutdown stopped the replica gracefully: its record went with it (EngineDeployment.__del__)
    assert read_records(registry.root, "quickstart") == []

    failed = [r for r in results if r.status != 200 or r.error]
    assert not failed, failed[:5]
    for r in results:
        assert r.version in expected, r
        assert r.text == expected[r.version][r.prompt], r
    # Once a new version has answered, every request sent afterwards is answered by it.
    for first, until in ((first_v2, rolled_back_at), (first_v1, float("inf"))):
        later = [r for r in results if first.ended <= r.started and r.ended < until]
        assert later and all(r.version == first.version for r in later)
    assert reload["version"] == "v0001" and reload["error"] is None
    assert health["status"] == "ok" and health["num_switches"] == 2 and health["version"] == "v0001"

    during = [r for r in results if promoted_at <= r.ended <= first_v2.ended]
    figures = {
        "requests": len(results),
        "failed": len(failed),
        "streaming": sum(r.stream for r in results),
        "promote_switch_s (alias poll)": round(first_v2.ended - promoted_at, 3),
        "rollback_switch_s (admin reload)": round(first_v1.ended - rolled_back_at, 3),
        "requests_served_during_promote_switch": len(during),
        "serving_record_after_first_v2_response_s": round(record_after_switch_s, 3),
        "v1_responses_after_promote": sum(
            r.version == "v0001" for r in results if promoted_at <= r.ended < rolled_back_at
        ),
    }
    print(f"promotion switch ({ingress} ingress):", json.dumps(figures))
