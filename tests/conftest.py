"""Suite-wide settings: runtime env defaults for every test process, and the `gpu` marker."""

from __future__ import annotations

import os

import pytest

from clusterft.runtime import apply_runtime_defaults

apply_runtime_defaults()
# Ray Train starts a PreemptionWatcher actor (a fresh Python process, ~1.6 CPU-s on 2 cores) with
# every worker group, only to observe cloud spot preemption, which no test has. The suite starts
# ~100 worker groups. Inherited by every Ray cluster and CLI subprocess the tests start.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `@pytest.mark.gpu` tests on machines without CUDA; nothing else is ever skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
