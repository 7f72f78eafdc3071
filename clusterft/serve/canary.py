"""The automatic rollback of a canary: each engine replica counts how its canary's requests end and
sets the canary's weight to 0 through the registry (an alias-history entry naming why) once

    server errors / requests > policy.max_error_rate, over at least policy.min_requests, or
    the canary's eval metric (its manifest's) is worse than production's by > max_eval_regression.

Counts are per replica and start when the canary takes traffic: a replica acts on what it saw, and
the registry's weight change is idempotent, so two replicas rolling back at once write one entry.
The replica stops routing to the canary at once, before the registry write, so no request after the
verdict lands on it (clusterft/serve/follower.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clusterft.config.spec import HIGHER_IS_BETTER
from clusterft.serve.spec import CanaryPolicy


@dataclass
class Outcomes:
    """How a version's requests ended on this replica since it took traffic."""

    requests: int = 0
    errors: int = 0  # server errors (5xx); a client's bad request is not the version's fault

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def error_verdict(policy: CanaryPolicy, canary: Outcomes) -> str | None:
    """Why the canary must be rolled back for its errors, or None."""
    if canary.requests < policy.min_requests or canary.error_rate <= policy.max_error_rate:
        return None
    return (
        f"automatic rollback: canary error rate {canary.error_rate:.3f} > max_error_rate "
        f"{policy.max_error_rate} over {canary.requests} requests"
    )


def eval_verdict(
    policy: CanaryPolicy, canary_eval: dict[str, Any], production_eval: dict[str, Any]
) -> str | None:
    """Why the canary must be rolled back for its eval metric, or None (no metric configured, or one
    of the versions has none: nothing to compare, said in the log by the caller)."""
    metric = policy.eval_metric
    if metric is None or metric not in canary_eval or metric not in production_eval:
        return None
    canary, production = float(canary_eval[metric]), float(production_eval[metric])
    drop = production - canary if metric in HIGHER_IS_BETTER else canary - production
    if drop <= policy.max_eval_regression:
        return None
    return (
        f"automatic rollback: canary {metric} {canary:.4g} is worse than production's {production:.4g} "
        f"by {drop:.4g} > max_eval_regression {policy.max_eval_regression}"
    )


def is_server_error(chunk: dict[str, Any]) -> bool:
    """An engine chunk that failed the request for the server's reasons (not a resend for another
    tokenizer, not the caller's bad input)."""
    error = chunk.get("error")
    return error is not None and not chunk.get("tokenizer_changed") and error.get("status", 500) >= 500
