"""Prometheus metrics of one ingress replica: request latencies measured at the HTTP edge, every API
request counted under how it ended, and the engine's gauges (KV usage, queue lengths, preemptions,
prefix cache) of every live engine replica.

    clusterft_requests_running{replica="r1"} 2    each engine replica's own series, by its id ...
    clusterft_requests_running{replica="r2"} 1
    clusterft_requests_running 3                   ... and the app's total (sums; KV usage and the
                                                   prefix hit rate as ratios of the summed counts)

The per-replica series are named clusterft_replica_*, so that summing any one metric over its
labels counts each replica once. Engine replicas send their stats with their admin sync
(clusterft/serve/admin.py, every 0.2 s): a scrape shows them at most that old, and a replica that
stopped syncing drops out once it is no longer live.

Requests an engine ran are also counted per model alias and version (production and canary of a
traffic split), from the response's x-clusterft-model-alias/-version headers:

    clusterft_version_requests_total{alias="canary",version="v0004",status="503"} 3
    clusterft_version_request_latency_seconds_bucket{alias="canary",version="v0004",le="0.5"} 40

A private CollectorRegistry per ingress: two apps in one process (tests) never share series.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray.exceptions import TaskCancelledError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clusterft.serve.version_routes import MODEL_ALIAS_HEADER, MODEL_VERSION_HEADER

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the response ended

Stats = dict[str, dict[str, Any]]  # engine replica id -> its stats


def _sum(key: str) -> Callable[[Stats], float]:
    return lambda replicas: sum(stats[key] for stats in replicas.values())


def _kv_usage(replicas: Stats) -> float:
    """Blocks in use over all replicas' blocks (pools may differ in size)."""
    num_blocks = sum(s["num_kv_blocks"] for s in replicas.values())
    used = sum(s["kv_usage"] * s["num_kv_blocks"] for s in replicas.values())
    return used / num_blocks if num_blocks else 0.0


def _prefix_hit_rate(replicas: Stats) -> float:
    queries = sum(s["prefix_cache_queries"] for s in replicas.values())
    return sum(s["prefix_cache_hits"] for s in replicas.values()) / queries if queries else 0.0


@dataclass(frozen=True)
class _Series:
    name: str  # clusterft_<name>: the app's total; clusterft_replica_<name>{replica}: per replica
    help: str
    kind: str  # gauge | counter
    total: Callable[[Stats], float] | None  # None: per replica only (a sum would mean nothing)


# engine stats key -> its series
_ENGINE_SERIES = {
    "kv_usage": _Series("kv_cache_usage_ratio", "KV blocks in use / all KV blocks", "gauge", _kv_usage),
    "num_kv_blocks": _Series("kv_cache_blocks", "KV blocks of the engines", "gauge", _sum("num_kv_blocks")),
    "num_running": _Series(
        "requests_running", "Requests running in the engine", "gauge", _sum("num_running")
    ),
    "num_waiting": _Series(
        "requests_waiting", "Requests waiting for admission", "gauge", _sum("num_waiting")
    ),
    "num_swapped": _Series(
        "requests_swapped", "Requests swapped out to CPU blocks", "gauge", _sum("num_swapped")
    ),
    "prefix_cache_hit_rate": _Series(
        "prefix_cache_hit_rate", "Prompt tokens found cached / looked up", "gauge", _prefix_hit_rate
    ),
    "prefix_cache_queries": _Series(
        "prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache",
        "counter",
        _sum("prefix_cache_queries"),
    ),
    "prefix_cache_hits": _Series(
        "prefix_cache_hits", "Prompt tokens found in the prefix cache", "counter", _sum("prefix_cache_hits")
    ),
    "num_preemptions_recompute": _Series(
        "preemptions_recompute", "Preemptions by recompute", "counter", _sum("num_preemptions_recompute")
    ),
    "num_preemptions_swap": _Series(
        "preemptions_swap", "Preemptions by swap-out", "counter", _sum("num_preemptions_swap")
    ),
    "num_steps": _Series("engine_steps", "Engine steps", "counter", _sum("num_steps")),
    "num_engine_failures": _Series(
        "engine_failures", "Engine rebuilds after a failed step", "counter", _sum("num_engine_failures")
    ),
    "model_weight_version": _Series("model_version", "Registry version number now served", "gauge", None),
    "num_model_switches": _Series(
        "model_switches", "Switches to another model version", "counter", _sum("num_model_switches")
    ),
    "num_model_load_failures": _Series(
        "model_load_failures",
        "Model versions that failed to load (the previous one kept serving)",
        "counter",
        _sum("num_model_load_failures"),
    ),
}


def _family(name: str, help_: str, kind: str, labels: list[str] | None = None):
    cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
    return cls(name, help_, labels=labels)


class _EngineCollector:
    """Yields the engine replicas' last stats; the ingress refreshes them just before each scrape."""

    def __init__(self) -> None:
        self.replicas: Stats = {}

    def collect(self):
        replicas = self.replicas
        yield GaugeMetricFamily(
            "clusterft_engine_replicas", "Engine replicas whose stats these are", value=len(replicas)
        )
        if not replicas:
            return
        for key, series in _ENGINE_SERIES.items():
            if series.total is not None:
                total = _family(f"clusterft_{series.name}", series.help, series.kind)
                total.add_metric([], float(series.total(replicas)))
                yield total
            per_replica = _family(
                f"clusterft_replica_{series.name}",
                f"{series.help} (per engine replica)",
                series.kind,
                ["replica"],
            )
            for replica in sorted(replicas):
                per_replica.add_metric([replica], float(replicas[replica][key]))
            yield per_replica


# One holder per API request: where a response already under way (a stream) ends with an error event,
# the ingress notes that error's status here and the request counts under it.
_request_outcome: ContextVar[dict[str, int] | None] = ContextVar("clusterft_request_outcome", default=None)


def note_error_status(status: int) -> None:
    """The request being answered failed with `status` after its response head was sent (a stream's
    error event): count it under `status`, not under the 200 of its head."""
    holder = _request_outcome.get()
    if holder is not None:
        holder["status"] = status


class RequestCounter:
    """ASGI middleware (outermost: it sees RequestGuard's 401/413 too) counting each API request (paths
    under /v1) once, when its response ends, in `clusterft_requests_total{status}`: the response's
    status; a stream's error status when it ended with an error event; 500 for an exception the
    server's error handler answers; 499 when the response never ended (the client went away: Serve
    cancelled the request). Counted before the response's last byte is sent, so a client that got its
    answer sees it counted."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], ServeMetrics]) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        holder: dict[str, int] = {}
        token = _request_outcome.set(holder)
        counted = False
        started = time.perf_counter()
        served_by: dict[str, str] = {}  # alias and version, from the response head

        def count(status: int) -> None:
            nonlocal counted
            if not counted:
                counted = True
                metrics = self.metrics()
                metrics.requests.labels(str(status)).inc()
                if "version" in served_by:
                    labels = (served_by.get("alias", ""), served_by["version"])
                    metrics.version_requests.labels(*labels, str(status)).inc()
                    metrics.version_latency.labels(*labels).observe(time.perf_counter() - started)

        async def send_counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                holder.setdefault("status", message["status"])
                served_by.update(_served_by(message))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count(holder["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        except Exception as exc:
            # Serve cancels the request of a client that went away: a stream's receive() may then
            # raise TaskCancelledError rather than the task being cancelled.
            count(CLIENT_CLOSED_REQUEST if isinstance(exc, TaskCancelledError) else 500)
            raise
        finally:
            count(CLIENT_CLOSED_REQUEST)  # a no-op when the response ended
            _request_outcome.reset(token)


def _served_by(start: Message) -> dict[str, str]:
    """The model alias and version a response head names (set by version_routes' middleware)."""
    names = {MODEL_VERSION_HEADER.encode(): "version", MODEL_ALIAS_HEADER.encode(): "alias"}
    return {names[k]: v.decode() for k, v in start.get("headers", []) if k in names}


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = self._latency("time_to_first_token", "Request arrival to its first output token")
        self.itl = self._latency("inter_token_latency", "Time between output tokens of a request")
        self.e2e = self._latency("request_latency", "Request arrival to its last token")
        self.prompt_tokens = Counter(
            "clusterft_prompt_tokens", "Prompt tokens of served requests", registry=self.registry
        )
        self.generation_tokens = Counter(
            "clusterft_generation_tokens", "Tokens generated", registry=self.registry
        )
        self.requests = Counter(
            "clusterft_requests",
            "Finished API requests (/v1) by how they ended: status, a stream's error status, 499 gone",
            ["status"],
            registry=self.registry,
        )
        self.version_requests = Counter(
            "clusterft_version_requests",
            "Finished API requests an engine ran, by model alias (production, canary), version and status",
            ["alias", "version", "status"],
            registry=self.registry,
        )
        self.version_latency = Histogram(
            "clusterft_version_request_latency_seconds",
            "Request arrival to its response's end, by the model alias and version that ran it",
            ["alias", "version"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.engine = _EngineCollector()
        self.registry.register(self.engine)

    def _latency(self, name: str, help_: str) -> Histogram:
        """A latency histogram `clusterft_<name>_seconds` in this ingress's registry."""
        return Histogram(f"clusterft_{name}_seconds", help_, registry=self.registry, buckets=_LATENCY_BUCKETS)

    def observe_tokens(self, gap_s: float, num_tokens: int) -> None:
        """A message carrying `num_tokens` tokens arrived `gap_s` after the previous one."""
        for _ in range(num_tokens):
            self.itl.observe(gap_s / num_tokens)

    def render(self, engine_stats: Stats) -> bytes:
        """The text exposition, with `engine_stats` (replica id -> stats) as the engine series."""
        self.engine.replicas = engine_stats
        return generate_latest(self.registry)
