"""Autoscaling the engine deployment on the engine's own load (a Ray Serve custom autoscaling policy).

Serve's default policy counts requests ongoing at the replicas, which for a streaming engine says
little about how loaded it is: one request may hold a few KV blocks or thousands, and a request
admitted by Serve may still wait in the engine's queue. Each engine replica reports its engine's
load (EngineDeployment.record_autoscaling_stats -> `engine_load`), Serve averages every metric per
replica over `look_back_period_s`, and `EngineLoadPolicy` asks for as many replicas as the larger of

    requests in the engine (running + waiting) / target_requests_per_replica
    KV blocks in use, summed over replicas (each replica's usage ratio) / target_kv_usage

Serve then applies the deployment's bounds (min/max replicas) and its up/down-scale delays.

This module is pickled by value into Serve's controller (Serve does that for custom policies): it
imports nothing of clusterft.
"""

from __future__ import annotations

import math
from typing import Any

ENGINE_WAITING = "clusterft_engine_waiting"
ENGINE_RUNNING = "clusterft_engine_running"
KV_USAGE = "clusterft_kv_usage"
POLICY_PATH = "clusterft.serve.autoscaling:EngineLoadPolicy"


def engine_load(stats: dict[str, Any]) -> dict[str, float]:
    """The metrics a replica reports from its engine's stats (EngineLoop.stats)."""
    return {
        ENGINE_WAITING: float(stats["num_waiting"] + stats["num_swapped"]),
        ENGINE_RUNNING: float(stats["num_running"]),
        KV_USAGE: float(stats["kv_usage"]),
    }


def desired_replicas(
    per_replica: dict[str, dict[Any, float]],
    current: int,
    target_requests_per_replica: float,
    target_kv_usage: float,
) -> float:
    """Replicas for this load (before Serve's bounds and delays); `current` while no replica has
    reported yet (a new deployment, or every replica just replaced)."""
    running = per_replica.get(ENGINE_RUNNING) or {}
    if not running:
        return current
    waiting = per_replica.get(ENGINE_WAITING) or {}
    kv = per_replica.get(KV_USAGE) or {}
    requests = sum(running.values()) + sum(waiting.values())
    by_requests = requests / target_requests_per_replica
    by_kv = sum(kv.values()) / target_kv_usage
    return max(by_requests, by_kv)


class EngineLoadPolicy:
    """Serve's custom policy (a class: Serve builds it once with `policy_kwargs`, then calls it with
    each tick's AutoscalingContext and returns (replicas, policy state))."""

    def __init__(self, target_requests_per_replica: float = 16.0, target_kv_usage: float = 0.8) -> None:
        if target_requests_per_replica <= 0 or not 0 < target_kv_usage <= 1:
            raise ValueError(
                f"EngineLoadPolicy: target_requests_per_replica ({target_requests_per_replica}) must be > 0 "
                f"and target_kv_usage ({target_kv_usage}) in (0, 1]"
            )
        self.target_requests_per_replica = target_requests_per_replica
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        desired = desired_replicas(
            ctx.aggregated_metrics or {},
            ctx.current_num_replicas,
            self.target_requests_per_replica,
            self.target_kv_usage,
        )
        bounded = min(
            max(math.ceil(desired), ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas
        )
        return bounded, ctx.policy_state
