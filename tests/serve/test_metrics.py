"""/metrics without Ray: the engine series of several replicas (each under its `replica` label, and the
app's totals) and the request counter as ASGI middleware of a real FastAPI app."""

from __future__ import annotations

import asyncio
from dataclasses import fields

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import TaskCancelledError

from clusterft.engine.outputs import EngineStats
from clusterft.http import APIError, add_error_handlers
from clusterft.serve.metrics import RequestCounter, ServeMetrics, note_error_status


def samples(text: bytes) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def replica_stats(**values: float) -> dict[str, float]:
    """What an engine replica sends (ModelFollower.stats): the engine's stats and the follower's."""
    extra = ("num_engine_failures", "num_streams", "num_kv_blocks", "model_weight_version")
    extra += ("num_model_switches", "num_model_load_failures")
    return {**{f.name: 0 for f in fields(EngineStats)}, **dict.fromkeys(extra, 0), **values}


def test_engine_series_per_replica_and_app_totals():
    a = replica_stats(kv_usage=0.5, num_kv_blocks=100, num_running=2, num_steps=7, model_weight_version=3)
    b = replica_stats(kv_usage=0.25, num_kv_blocks=300, num_running=1, num_steps=5, model_weight_version=4)
    a.update(prefix_cache_queries=30, prefix_cache_hits=10, prefix_cache_hit_rate=1 / 3)
    b.update(prefix_cache_queries=10, prefix_cache_hits=10, prefix_cache_hit_rate=1.0)
    got = samples(ServeMetrics().render({"r1": a, "r2": b}))
    r1, r2 = (("replica", "r1"),), (("replica", "r2"),)

    assert got["clusterft_engine_replicas"] == {(): 2.0}
    assert got["clusterft_requests_running"] == {(): 3.0}
    assert got["clusterft_replica_requests_running"] == {r1: 2.0, r2: 1.0}
    assert got["clusterft_engine_steps_total"] == {(): 12.0}
    assert got["clusterft_replica_engine_steps_total"] == {r1: 7.0, r2: 5.0}
    # Ratios of the summed counts, not sums (nor means) of ratios: (50 + 75) / 400 blocks, 20 / 40 tokens.
    assert got["clusterft_kv_cache_usage_ratio"] == {(): 0.3125}
    assert got["clusterft_prefix_cache_hit_rate"] == {(): 0.5}
    assert got["clusterft_kv_cache_blocks"] == {(): 400.0}
    # A version has no total: each replica says what it serves.
    assert "clusterft_model_version" not in got
    assert got["clusterft_replica_model_version"] == {r1: 3.0, r2: 4.0}

    empty = samples(ServeMetrics().render({}))
    assert empty["clusterft_engine_replicas"] == {(): 0.0} and "clusterft_requests_running" not in empty


def test_each_api_request_is_counted_once_under_how_it_ended():
    metrics = ServeMetrics()
    app = FastAPI()
    app.add_middleware(RequestCounter, metrics=lambda: metrics)
    add_error_handlers(app)

    @app.get("/v1/ok")
    async def ok() -> dict:
        return {}

    @app.get("/v1/refused")
    async def refused() -> dict:
        raise APIError(503, "server overloaded; retry later")

    @app.get("/v1/crash")
    async def crash() -> dict:
        raise RuntimeError("a bug")

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        async def events():
            yield "data: {}\n\n"
            note_error_status(503)  # the engine replica died mid-stream
            yield 'data: {"error": {}}\n\n'

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/gone")
    async def gone() -> dict:
        raise TaskCancelledError()  # what Serve raises in a request whose client disconnected

    @app.get("/health")
    async def health() -> dict:
        return {}

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            paths = ["/v1/ok", "/v1/ok", "/v1/refused", "/v1/crash", "/v1/stream", "/v1/nope", "/v1/gone"]
            return [(await client.get(path)).status_code for path in [*paths, "/health"]]

    assert asyncio.run(main()) == [200, 200, 503, 500, 200, 404, 500, 200]
    counted = samples(metrics.render({}))["clusterft_requests_total"]
    # /health is no API request; the stream's head said 200, its end said 503; the client of /v1/gone
    # went away (nobody read that 500).
    assert {dict(labels)["status"]: n for labels, n in counted.items()} == {
        "200": 2.0,
        "503": 2.0,
        "500": 1.0,
        "404": 1.0,
        "499": 1.0,
    }
