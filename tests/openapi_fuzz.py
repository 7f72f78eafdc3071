"""Schemathesis over an app's own OpenAPI schema: requests generated from every operation (valid ones
and ones that break the schema on purpose), sent one after another, every status counted. The tests
that use it assert that none was a 500: whatever a client sends, the server answers it in a 4xx."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from schemathesis import GenerationMode


@dataclass
class FuzzReport:
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    per_operation: collections.Counter[str] = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)  # curl lines that got a 5xx (503 aside)
    elapsed_s: float = 0.0

    @property
    def num_requests(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.per_operation.items()))
        return (
            f"{self.num_requests} generated requests in {self.elapsed_s:.1f} s; "
            f"statuses {dict(sorted(self.statuses.items()))}; per operation: {ops}"
        )


def fuzz(
    schema: schemathesis.BaseSchema,
    send: Callable[[schemathesis.Case], Any],
    max_examples: int,
    seed: int = 0,
) -> FuzzReport:
    """Send `max_examples` cases generated from `schema` (positive and negative, drawn across all its
    operations) through `send`, which returns the response. Deterministic for a given seed."""
    report = FuzzReport()
    cases = st.one_of(
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @hypothesis_seed(seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=cases)
    def run(case: schemathesis.Case) -> None:
        response = send(case)
        report.statuses[response.status_code] += 1
        report.per_operation[f"{case.method.upper()} {case.operation.path}"] += 1
        if response.status_code >= 500 and response.status_code != 503:
            report.server_errors.append(f"{response.status_code}: {case.as_curl_command()}")

    started = time.monotonic()
    run()
    report.elapsed_s = time.monotonic() - started
    return report
