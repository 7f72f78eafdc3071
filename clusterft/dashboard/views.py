"""What the dashboard shows, as JSON-ready dicts read from the job store, the run's files, the
registry and the serve app's Prometheus text: pure reads, no HTTP here (routes.py serves them)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from clusterft.controller.policy import parse_gate
from clusterft.controller.state import Job
from clusterft.controller.stored_spec import job_spec
from clusterft.registry.registry import ALIAS_NAMES, Registry
from clusterft.registry.serving import read_records
from clusterft.storage import BundleStore
from clusterft.train.export import read_metrics

METRIC_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "attempt")


def metric_series(job: Job, after_step: int = 0) -> list[dict[str, Any]]:
    """The job's step records after `after_step` (the page asks for what it has not drawn yet)."""
    records = read_metrics(Path(job_spec(job).train.output_dir) / "metrics.jsonl")
    return [
        {key: _finite(record.get(key)) for key in METRIC_KEYS}
        for step, record in records.items()
        if step > after_step
    ]


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a diverged loss is shown as a gap, not a broken response."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class CheckpointLister:
    """The job's checkpoint bundles with step, size and validity. One BundleStore per folder is kept,
    so each bundle's files are hashed once, not at every poll of the page."""

    def __init__(self) -> None:
        self._stores: dict[str, BundleStore] = {}

    def _store(self, root: str) -> BundleStore:
        if root not in self._stores:
            self._stores[root] = BundleStore(root)
        return self._stores[root]

    def list(self, job: Job) -> list[dict[str, Any]]:
        from clusterft.train.launcher import locate  # torch and DeepSpeed: not at the API's start

        main = self._store(locate(job_spec(job)).bundle_root)
        stores = [self._stores.setdefault(run.storage.uri, run) for run in main.runs()]  # main first
        return [
            {
                "folder": store.storage.uri,
                "name": info.name,
                "step": info.step,
                "size_bytes": info.size_bytes,
                "valid": info.valid,
                "problem": info.problem,
                "created": info.created,
            }
            for store in stores
            for info in store.list(verify=True)
        ]


def evaluation(job: Job) -> dict[str, Any]:
    """The job's evaluation metrics (once evaluated) against its spec's promotion gates."""
    spec = job_spec(job)
    metrics: dict[str, Any] = dict(job.result.get("eval") or {})
    gates = []
    for text in spec.promote.gates:
        gate = parse_gate(text)
        value = metrics.get(gate.metric)
        passes = gate.passes(float(value)) if isinstance(value, int | float) else None
        gates.append({"gate": str(gate), "metric": gate.metric, "value": _finite(value), "passes": passes})
    return {
        "metrics": {k: _finite(v) for k, v in metrics.items()},
        "gates": gates,
        "registered": {k: job.result.get(k) for k in ("model_name", "version") if k in job.result},
    }


def registry_view(registry: Registry, now: float) -> dict[str, Any]:
    """Every model: versions (newest first), aliases, the aliases' history, the replicas serving it."""
    models = []
    for name in registry.models():
        versions = [
            {
                "version": v.version,
                "kind": v.manifest.kind,
                "created_at": v.manifest.created_at,
                "job_id": v.manifest.job_id,
                "eval": {k: _finite(x) for k, x in v.manifest.eval.items()},
            }
            for v in reversed(registry.versions(name))
        ]
        models.append(
            {
                "name": name,
                "versions": versions,
                "aliases": registry.aliases(name),
                "canary_weight": registry.traffic(name).canary_weight,
                "history": [asdict(change) for change in registry.alias_history(name)],
                "serving": [{**asdict(r), "live": r.live(now)} for r in read_records(registry.root, name)],
            }
        )
    return {
        "models": models,
        "aliases": list(ALIAS_NAMES),
        # What the registry can do, so the page shows only controls that work: aliases move
        # (promote, rollback), and the canary takes a share of the traffic (its weight).
        "actions": ["promote", "rollback", "canary"],
        "canary_weights": True,
    }


def serving_summary(prometheus_text: str) -> dict[str, Any]:
    """The serve app's /metrics as the dashboard's figures: replicas, version served, KV usage,
    prefix hit rate, running/waiting requests, mean TTFT and ITL, finished requests in total."""
    samples: dict[str, float] = {}
    per_replica: dict[str, dict[str, float]] = {}
    requests_total = 0.0
    for family in text_string_to_metric_families(prometheus_text):
        for sample in family.samples:
            replica = sample.labels.get("replica")
            if replica is not None:
                per_replica.setdefault(replica, {})[sample.name] = sample.value
            elif sample.name == "clusterft_requests_total":
                requests_total += sample.value
            elif not sample.labels:
                samples[sample.name] = sample.value

    def mean(histogram: str) -> float | None:
        count = samples.get(f"clusterft_{histogram}_seconds_count", 0.0)
        return samples[f"clusterft_{histogram}_seconds_sum"] / count if count else None

    replicas = [
        {
            "replica": replica,
            "version": values.get("clusterft_replica_model_version"),
            "kv_usage": values.get("clusterft_replica_kv_cache_usage_ratio"),
            "running": values.get("clusterft_replica_requests_running"),
            "waiting": values.get("clusterft_replica_requests_waiting"),
        }
        for replica, values in sorted(per_replica.items())
    ]
    return {
        "engine_replicas": int(samples.get("clusterft_engine_replicas", 0)),
        "replicas": replicas,
        "kv_usage": samples.get("clusterft_kv_cache_usage_ratio"),
        "prefix_cache_hit_rate": samples.get("clusterft_prefix_cache_hit_rate"),
        "requests_running": samples.get("clusterft_requests_running"),
        "requests_waiting": samples.get("clusterft_requests_waiting"),
        "ttft_mean_s": mean("time_to_first_token"),
        "itl_mean_s": mean("inter_token_latency"),
        "requests_total": requests_total,
    }
