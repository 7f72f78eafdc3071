"""Canary traffic on the real app (Ray + Serve on 127.0.0.1, the official openai client; the separate
ingress and the direct one): one app serves production and the canary the registry gives 50% of the
traffic; each session id sticks to one version, the split over 400 session ids is the registry's
routing and within the binomial bound, every response names its alias and version, the metrics count
requests per alias and version, and a canary whose eval metric regresses is rolled back by the app
itself with no failed request."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import openai
import pytest

from clusterft.registry.registry import Registry
from clusterft.serve.routing import SESSION_HEADER
from clusterft.serve.spec import CanaryPolicy, RegistrySource, ServeSpec
from clusterft.serve.version_routes import MODEL_ALIAS_HEADER, MODEL_VERSION_HEADER
from tests.serve.conftest import ENGINE, free_port, running_app

pytestmark = pytest.mark.slow

VERSION_OF = {"production": "v0001", "canary": "v0002"}


async def ask_all(url: str, sessions: list[str]) -> list[tuple[str, str, str]]:
    """(alias, version, model field) of one completion per session, 8 at a time, official client."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(8)

    async def one(session: str) -> tuple[str, str, str]:
        async with gate:
            raw = await client.completions.with_raw_response.create(
                model="quick",
                prompt="hello there",
                max_tokens=1,
                temperature=0,
                extra_headers={SESSION_HEADER: session},
            )
        return raw.headers[MODEL_ALIAS_HEADER], raw.headers[MODEL_VERSION_HEADER], raw.parse().model

    try:
        return await asyncio.gather(*(one(s) for s in sessions))
    finally:
        await client.close()


def wait_for(predicate, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout_s}s"
        time.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


@pytest.mark.parametrize("ingress", ["separate", "direct"])
def test_one_app_serves_a_sticky_weighted_split_and_rolls_back_a_regressed_canary(tmp_path, ingress):
    from clusterft.hf.tiny import make_tiny_model

    registry = Registry(tmp_path / "registry")
    models = [make_tiny_model(tmp_path / f"seed{seed}", "llama", "tiny", seed=seed) for seed in (0, 1)]
    for model, score in ((models[0], 0.60), (models[1], 0.61), (models[1], 0.30)):
        registry.register("quick", model, kind="full", eval_results={"exact_match": score})
    registry.promote("quick", "v1")
    registry.set_canary("quick", "v2", 50)
    policy = CanaryPolicy(eval_metric="exact_match", max_eval_regression=0.05)
    spec = ServeSpec(
        registry=RegistrySource(
            root=str(registry.root), model_name="quick", poll_interval_s=0.25, canary=policy
        ),
        port=free_port(),
        ingress=ingress,  # direct: the engine replica reads the routing key in process
        engine=ENGINE,
        engine_num_cpus=0.5,
        worker_num_cpus=0.5,
        ingress_num_cpus=0.25,
    )
    sessions = [f"session-{i}" for i in range(400)]
    split = registry.traffic("quick")
    with running_app(spec) as url:
        wait_for(lambda: httpx.get(f"{url}/health").json()["canary"]["version"] == "v0002", "canary loaded")
        answers = asyncio.run(ask_all(url, sessions))
        again = asyncio.run(ask_all(url, sessions[:40]))
        metrics = httpx.get(f"{url}/metrics").text

        # the regressed v3 becomes the canary while clients keep sending: the app rolls it back itself
        stop, during = threading.Event(), []

        def load() -> None:
            while not stop.is_set():
                during.extend(asyncio.run(ask_all(url, sessions[:16])))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            registry.set_canary("quick", "v3", 50)
            wait_for(lambda: registry.traffic("quick").canary_weight == 0, "automatic rollback")
            after = asyncio.run(ask_all(url, sessions[:40]))
        finally:
            stop.set()
            loader.join(timeout=120)
        health = httpx.get(f"{url}/health").json()

    assert {a[2] for a in answers} == {"quick"}  # the model field stays the requested name
    assert all(version == VERSION_OF[alias] for alias, version, _ in answers)
    routed = [split.route(s) for s in sessions]
    assert [a[0] for a in answers] == routed  # each session where the registry's hash puts it
    # Binomial(400, 0.5): mean 200, sd 10; [160, 240] is +-4 sd (a uniform hash falls outside < 1e-4)
    assert 160 <= routed.count("canary") <= 240
    assert again == answers[:40]  # sticky
    for alias, version in VERSION_OF.items():
        count = sum(a[0] == alias for a in answers + again)
        labels = {"alias": alias, "version": version}
        assert metric(metrics, "clusterft_version_requests_total", status="200", **labels) == count
        assert metric(metrics, "clusterft_version_request_latency_seconds_count", **labels) == count

    last = registry.alias_history("quick")[-1]
    assert (last.alias, last.version, last.weight, last.previous_weight) == ("canary", "v0003", 0, 50)
    assert "exact_match 0.3 is worse than production's 0.6" in (last.reason or "")
    assert set(after) == {("production", "v0001", "quick")}
    assert during and all(a[1] in ("v0001", "v0002") for a in during)  # none failed (raised), none on v3
    assert health["canary"]["num_rollbacks"] == 1 and health["canary"]["version"] is None
