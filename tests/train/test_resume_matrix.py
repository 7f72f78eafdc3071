"""Exact resume for every strategy: a SIGKILLed worker, then the run resumes from its newest bundle
and ends with trainable weights bitwise equal to an uninterrupted run's (CPU, fp32).

    strategy        LoRA   full        models
    ddp             yes    yes         llama, qwen2 (GQA, qkv biases, tied embeddings)
    zero2/3         yes    yes
    zero3 offload   yes    yes
    pipeline        -      yes         (the spec refuses LoRA with model parallelism)
    tensor          -      yes

Each cell runs the job twice on the module's 2-CPU Ray cluster, 4 steps with a bundle every step:
once uninterrupted, once with worker rank 1 SIGKILLed as soon as the step-2 bundle is published.
LoRA dropout is on, so the restored RNG states matter. The qwen2 cells are marked slow.

What qwen2 adds meets the resume where weights are trained whole: its tied embeddings and qkv biases
are frozen under LoRA, and GQA only changes the adapters' shapes. So qwen2 runs every full cell, and
of the LoRA cells only zero3 with offload (partitioned and offloaded adapters, the most involved
save); its other LoRA cells would repeat llama's (about a minute each on CI's 2 cores).

zero1 has no cell: ZeRO-1 and ZeRO-2 keep the same optimizer (DeepSpeedZeroOptimizer; stage 2 only
also partitions gradients, which a bundle does not hold), so a bundle's layout, save and restore
are the same code for both (clusterft/train/state.py:layout, `stage in (1, 2)`). zero1 still trains
in test_training.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from clusterft.hf.tiny import make_tiny_model
from clusterft.train.export import read_metrics
from clusterft.train.launcher import run_training
from tests.train.helpers import DATA_PARALLEL, WorkerKiller, final_weights, make_job

STRATEGIES = {
    **{name: parallel for name, parallel in DATA_PARALLEL.items() if name != "zero1"},
    "pipeline": {"strategy": "pipeline", "pipeline_stages": 2},
    "tensor": {"strategy": "tensor", "tensor_parallel_size": 2},
}
MODEL_PARALLEL = ("pipeline", "tensor")
METHODS = {
    "lora": {"finetuning_type": "lora"},
    "full": {"finetuning_type": "full", "learning_rate": 2e-3},
}
QWEN2_LORA = ("zero3_offload",)
CELLS = [
    pytest.param(arch, strategy, method, marks=[pytest.mark.slow] if arch == "qwen2" else [])
    for arch in ("llama", "qwen2")
    for strategy in STRATEGIES
    for method in METHODS
    if not (strategy in MODEL_PARALLEL and method == "lora")
    and not (arch == "qwen2" and method == "lora" and strategy not in QWEN2_LORA)
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch, "tiny") for arch in ("llama", "qwen2")}


def job(model_dir: Path, out: Path, strategy: str, method: str):
    return make_job(
        model_dir, out, **METHODS[method], parallel=STRATEGIES[strategy],
        max_steps=4, save_steps=1, max_samples=32, warmup_steps=1,
    )  # fmt: skip


def losses(spec) -> dict[int, float]:
    return {
        step: r["loss"] for step, r in read_metrics(Path(spec.train.output_dir) / "metrics.jsonl").items()
    }


@pytest.mark.parametrize("arch, strategy, method", CELLS)
def test_sigkilled_worker_resumes_bitwise(ray_cluster, models, tmp_path, arch, strategy, method):
    started = time.perf_counter()
    reference = job(models[arch], tmp_path / "uninterrupted", strategy, method)
    summary = run_training(reference, show_progress=False)
    assert summary.ok, summary.error
    killed = job(models[arch], tmp_path / "killed", strategy, method)
    killer = WorkerKiller(killed, after_step=2)
    killer.start()
    resumed = run_training(killed, show_progress=False)
    killer.join(timeout=5)
    assert killer.killed_pid is not None, "no worker was killed"
    assert resumed.ok, resumed.error
    assert (resumed.restarts, resumed.completed_steps) == (1, 4)
    assert int(resumed.resumed_from[0].split("_")[1]) >= 2
    expected, actual = final_weights(reference), final_weights(killed)
    assert expected.keys() == actual.keys() and expected
    differ = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differ, f"weights differ after resume: {differ[:3]}"
    assert losses(killed) == losses(reference)  # every step's loss, bit for bit
    print(f"cell {arch}/{strategy}/{method}: {time.perf_counter() - started:.1f} s")
