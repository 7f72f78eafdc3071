"""GPU paths (skipped without CUDA): bf16/fp16 with DeepSpeed's fused optimizer over NCCL, and AutoTP."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from clusterft.train.export import read_metrics
from clusterft.train.launcher import run_training
from tests.train.helpers import make_job

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray
    import torch

    temp_dir = tempfile.mkdtemp(prefix="cftgpu", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=torch.cuda.device_count(), include_dashboard=False, _temp_dir=temp_dir)
    yield torch.cuda.device_count()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_zero2_learns_on_one_gpu(gpu_cluster, tiny_llama, tmp_path, precision):
    spec = make_job(
        tiny_llama,
        tmp_path / precision,
        **{precision: True},
        finetuning_type="full",
        learning_rate=2e-3,
        max_steps=30,
        cluster={"num_workers": 1, "gpus_per_worker": 1},
        parallel={"strategy": "zero2"},
    )
    summary = run_training(spec, show_progress=False)
    assert summary.ok, summary.error
    losses = [
        record["loss"] for _, record in sorted(read_metrics(tmp_path / precision / "metrics.jsonl").items())
    ]
    # A random tiny model starts near ln(vocab) = 6.93: learning must take the loss well below its start.
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0, losses


def test_autotp_on_two_gpus(gpu_cluster, tiny_llama, tmp_path):
    if gpu_cluster < 2:
        pytest.skip("needs 2 GPUs")
    spec = make_job(
        tiny_llama,
        tmp_path / "tp",
        finetuning_type="full",
        cluster={"num_workers": 2, "gpus_per_worker": 1},
        parallel={"strategy": "tensor", "tensor_parallel_size": 2},
    )
    summary = run_training(spec, show_progress=False)
    assert summary.ok, summary.error
