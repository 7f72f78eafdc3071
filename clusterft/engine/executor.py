"""Executors run the engine's forward passes; the engine decides what they run.

    LLMEngine (scheduler, KV cache manager: block ids, prefix cache; detokenization)
        |  SchedulerOutput                         ^  ModelRunnerOutput
        v                                          |
    Executor (model weights, KV tensors, LoRA weights): LocalExecutor runs one ModelRunner in this
    process; serve/worker.py's WorkerGroup runs one per tensor-parallel worker actor.

An executor sizes the KV cache it allocates; the engine builds its block table from those counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

import torch

from clusterft.engine.cache_engine import CacheEngine
from clusterft.engine.config import EngineConfig
from clusterft.engine.lora import LoRAManager
from clusterft.engine.memory import kv_cache_budget
from clusterft.engine.model_runner import ModelRunner
from clusterft.engine.models import LlamaForCausalLM, ModelConfig, ParallelContext, load_model
from clusterft.engine.outputs import ModelRunnerOutput, SchedulerOutput
from clusterft.engine.sampler import Sampler

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_cache_blocks(
    config: EngineConfig, args: ModelConfig, tensor_parallel_size: int = 1, budget_bytes: int | None = None
) -> tuple[int, int]:
    """(device, CPU) KV blocks for the budgets, which are per worker: a worker holds 1/tp of every
    block, so tp workers hold tp times the blocks of one. `budget_bytes` is a worker's device budget
    (memory.kv_cache_budget, the smallest of all workers'); unused when config.num_gpu_blocks is set."""
    block_bytes = CacheEngine.block_bytes(
        args.num_layers,
        args.num_kv_heads // tensor_parallel_size,
        args.head_dim,
        config.block_size,
        _DTYPES[config.dtype],
    )
    if config.num_gpu_blocks is not None:
        num_gpu_blocks = config.num_gpu_blocks
    else:
        assert budget_bytes is not None, "size the KV cache from a loaded model's budget"
        num_gpu_blocks = max(budget_bytes // block_bytes, 1)
    num_cpu_blocks = (
        config.num_cpu_blocks
        if config.num_cpu_blocks is not None
        else int(config.swap_space * 2**30) // block_bytes
    )
    return num_gpu_blocks, num_cpu_blocks


def load_worker_model(
    model_dir: str | Path, config: EngineConfig, pc: ParallelContext | None = None
) -> LlamaForCausalLM:
    """One worker's model (its shard under `pc`) on the config's device."""
    model, _, _ = load_model(
        model_dir,
        dtype=_DTYPES[config.dtype],
        max_model_len=config.max_model_len,
        pc=pc or ParallelContext(),
        quant_group_size=config.quant_group_size if config.quantization == "int8" else None,
        quant_exclude_modules=config.quant_exclude_modules,
    )
    return model.to(config.device)


def worker_kv_budget(config: EngineConfig, model: LlamaForCausalLM, pc: ParallelContext | None = None) -> int:
    """The KV bytes this worker may allocate (0 when config.num_gpu_blocks fixes the count)."""
    if config.num_gpu_blocks is not None:
        return 0
    return kv_cache_budget(config, model, model.args.num_kv_heads // (pc or ParallelContext()).tp_size)


def build_model_runner(
    model: LlamaForCausalLM,
    config: EngineConfig,
    num_gpu_blocks: int,
    num_cpu_blocks: int,
    pc: ParallelContext | None = None,
) -> ModelRunner:
    """The runner around a loaded model: its heads of every KV block, and the config's LoRA
    adapters registered."""
    pc = pc or ParallelContext()
    dtype, args = _DTYPES[config.dtype], model.args
    cache = CacheEngine(
        args.num_layers, args.num_kv_heads // pc.tp_size, args.head_dim, config.block_size,
        num_gpu_blocks, num_cpu_blocks, dtype, config.device,
    )  # fmt: skip
    lora_manager = LoRAManager(
        model, config.max_loras, torch.device(config.device), dtype, pc, config.max_cpu_loras
    )
    for name, path in config.lora_modules:
        lora_manager.add_lora(name, path)
    return ModelRunner(
        model, cache, config.block_size, Sampler(config.seed), lora_manager, config.attention_backend
    )


class LoRARegistry(Protocol):
    """What the engine needs of an executor's adapters: the registered names and the sha256 of each
    one's bytes (its prefix-cache key), and changing them."""

    paths: dict[str, Path]
    digests: dict[str, str]

    def add_lora(self, name: str, path: str | Path) -> None: ...

    def remove_lora(self, name: str) -> None: ...


class Executor(ABC):
    num_gpu_blocks: int  # the KV blocks it allocated on each worker's device
    num_cpu_blocks: int  # and in each worker's CPU swap space
    lora_manager: LoRARegistry

    @abstractmethod
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every worker; the sampled tokens of the step."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise when a worker is gone."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers."""


class LocalExecutor(Executor):
    """The whole model and KV cache in this process."""

    def __init__(self, model_dir: Path, config: EngineConfig, model_args: ModelConfig) -> None:
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu'")
        model = load_worker_model(model_dir, config)
        budget = worker_kv_budget(config, model)
        self.num_gpu_blocks, self.num_cpu_blocks = kv_cache_blocks(config, model_args, 1, budget)
        self.runner = build_model_runner(model, config, self.num_gpu_blocks, self.num_cpu_blocks)
        self.lora_manager = self.runner.lora_manager

    @property
    def model(self) -> LlamaForCausalLM:
        return self.runner.model

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(so)

    def check_health(self) -> None:
        """Nothing to check: the model lives and dies with this process."""

    def shutdown(self) -> None:
        """Nothing to release: the model and KV tensors go with the engine."""
