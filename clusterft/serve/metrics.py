"""Prometheus metrics of one ingress replica: request latencies measured at the HTTP edge, and the
engine's gauges (KV usage, queue lengths, preemptions, prefix cache) read from the engine at scrape.

A private CollectorRegistry per ingress: two apps in one process (tests) never share series.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# engine stats key -> (metric name, help, kind)
_ENGINE_SERIES = {
    "kv_usage": ("clusterft_kv_cache_usage_ratio", "KV blocks in use / all KV blocks", "gauge"),
    "num_running": ("clusterft_requests_running", "Requests running in the engine", "gauge"),
    "num_waiting": ("clusterft_requests_waiting", "Requests waiting for admission", "gauge"),
    "num_swapped": ("clusterft_requests_swapped", "Requests swapped out to CPU blocks", "gauge"),
    "prefix_cache_hit_rate": (
        "clusterft_prefix_cache_hit_rate",
        "Prompt tokens found cached / looked up",
        "gauge",
    ),
    "prefix_cache_queries": (
        "clusterft_prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache",
        "counter",
    ),
    "prefix_cache_hits": (
        "clusterft_prefix_cache_hits",
        "Prompt tokens found in the prefix cache",
        "counter",
    ),
    "num_preemptions_recompute": ("clusterft_preemptions_recompute", "Preemptions by recompute", "counter"),
    "num_preemptions_swap": ("clusterft_preemptions_swap", "Preemptions by swap-out", "counter"),
    "num_steps": ("clusterft_engine_steps", "Engine steps", "counter"),
    "num_engine_failures": ("clusterft_engine_failures", "Engine rebuilds after a failed step", "counter"),
    "model_weight_version": ("clusterft_model_version", "Registry version number now served", "gauge"),
    "num_model_switches": ("clusterft_model_switches", "Switches to another model version", "counter"),
    "num_model_load_failures": (
        "clusterft_model_load_failures",
        "Model versions that failed to load (the previous one kept serving)",
        "counter",
    ),
}


class _EngineCollector:
    """Yields the last engine stats snapshot; the ingress refreshes it just before each scrape."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def collect(self):
        for key, (name, help_, kind) in _ENGINE_SERIES.items():
            if key not in self.stats:
                continue
            family = GaugeMetricFamily(name, help_) if kind == "gauge" else CounterMetricFamily(name, help_)
            family.add_metric([], float(self.stats[key]))
            yield family


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
            "clusterft_requests", "Finished HTTP requests by status", ["status"], registry=self.registry
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

    def render(self, engine_stats: dict[str, Any]) -> bytes:
        self.engine.stats = engine_stats
        return generate_latest(self.registry)
