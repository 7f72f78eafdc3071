"""Fixtures of the dashboard's browser tests: an ASGI app on a real 127.0.0.1 port, Debian's
chromium driven by Playwright (skipped, saying how to install it, when there is none), and where
screenshots go."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR") or Path(__file__).parents[1] / "artifacts") / "dashboard"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
# One engine replica's stats as it sends them with its admin sync (the serve app's /metrics input).
ENGINE_STATS = {
    "num_kv_blocks": 100, "kv_usage": 0.5, "num_running": 2, "num_waiting": 1, "num_swapped": 0,
    "prefix_cache_hit_rate": 0.0, "prefix_cache_queries": 40, "prefix_cache_hits": 10,
    "num_preemptions_recompute": 0, "num_preemptions_swap": 0, "num_steps": 7, "num_engine_failures": 0,
    "model_weight_version": 2, "num_model_switches": 1, "num_model_load_failures": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Debian chromium under Playwright (Playwright's own browser download needs the
    internet, which CI does not have)."""
    executable = next(filter(None, map(shutil.which, CHROMIUM_CANDIDATES)), None)
    if executable is None:
        pytest.skip(
            "no chromium on PATH: the dashboard's browser tests need one; install it with "
            "`apt-get install -y chromium` (.ci/run does)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def screenshot(request: pytest.FixtureRequest):
    """Save a page's screenshot as a test artifact: ARTIFACTS_DIR/dashboard/<test>-<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def save(page: Any, name: str) -> Path:
        path = ARTIFACTS / f"{request.node.name}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return save
