"""Shared helpers for the controller tests: a minimal job spec and a job record."""

from __future__ import annotations

from typing import Any

import pytest

from clusterft.config import JobSpec, parse_job_dict
from clusterft.controller.state import Job, State, Submitted


def make_spec(**sections: dict[str, Any]) -> JobSpec:
    """A valid spec (LLaMA-Factory flat keys) with clusterft sections given as keyword mappings."""
    raw: dict[str, Any] = {
        "model_name_or_path": "models/tiny-llama",
        "dataset": "demo_tasks",
        "output_dir": "saves/demo",
        "max_steps": 10,
        **sections,
    }
    return parse_job_dict(raw, "test.yaml")


def make_job(state: State | None = None, *, attempt: int = 1, restarts: int = 0) -> Job:
    return Job(
        id="job-20261128-091500-ab12",
        name="demo",
        spec_yaml="",
        spec_hash="0" * 64,
        state=state or Submitted(),
        attempt=attempt,
        restarts=restarts,
        created_at=0.0,
        updated_at=0.0,
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from clusterft.hf.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", "tiny")
