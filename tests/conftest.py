"""Suite-wide settings: runtime env defaults for every test process, and the `gpu` marker."""

from __future__ import annotations

import pytest

from clusterft.runtime import apply_runtime_defaults

apply_runtime_defaults()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `@pytest.mark.gpu` tests on machines without CUDA; nothing else is ever skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
