"""The example job specs in jobs/ load, and compile to DeepSpeed configs (from the repo root)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from clusterft.config import load_job_spec
from clusterft.train.deepspeed_config import build_deepspeed_config
from clusterft.train.plan import plan_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["zero3-offload", "pipeline", "llamafactory-compatible"])
def test_example_job_compiles(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # the specs use paths relative to the repo root, as the CLI does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LLaMA-Factory keys accepted but ignored
        spec = load_job_spec(ROOT / "jobs" / f"{name}.yaml")
    plan = plan_run(spec, spec.cluster.num_workers, num_train_examples=1024)
    config = build_deepspeed_config(spec, plan, hidden_size=128)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert "auto" not in repr(config)
    if name == "llamafactory-compatible":
        assert config["zero_optimization"]["reduce_bucket_size"] == 128 * 128
        assert config["bf16"] == {"enabled": False}
