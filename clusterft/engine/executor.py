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
from clusterft.engine.model_runner import ModelRunner
from clusterft.engine.models import LlamaForCausalLM, ModelConfig, ParallelContext, load_model
from clusterft.engine.outputs import ModelRunnerOutput, SchedulerOutput
from clusterft.engine.sampler import Sampler

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_cache_blocks(
    config: EngineConfig, args: ModelConfig, tensor_parallel_size: int = 1
) -> tuple[int, int]:
    """(device, CPU) KV blocks for the config's budgets, which are per worker: a worker holds 1/tp of
    every block, so tp workers hold tp times the blocks of one."""
    block_bytes = CacheEngine.block_bytes(
        args.num_layers,
        args.num_kv_heads // tensor_parallel_size,
        args.head_dim,
        config.block_size,
        _DTYPES[config.dtype],
    )
    num_gpu_blocks = config.num_gpu_blocks or max(int(config.kv_cache_space * 2**30) // block_bytes, 1)
    num_cpu_blocks = (
        config.num_cpu_blocks
        if config.num_cpu_blocks is not None
        else int(config.swap_space * 2**30) // block_bytes
    )
    return num_gpu_blocks, num_cpu_blocks


def load_model_runner(
    model_dir: str | Path,
    config: EngineConfig,
    num_gpu_blocks: int,
    num_cpu_blocks: int,
    pc: ParallelContext | None = None,
) -> ModelRunner:
    """One worker's runner: the model (its shard under `pc`), its heads of every KV block, and the
    config's LoRA adapters registered."""
    pc = pc or ParallelContext()
    dtype = _DTYPES[config.dtype]
    model, args, _ = load_model(
        model_dir,
        dtype=dtype,
        max_model_len=config.max_model_len,
        pc=pc,
        quant_group_size=config.quant_group_size if config.quantization == "int8" else None,
        quant_exclude_modules=config.quant_exclude_modules,
    )
    model = model.to(config.device)
    cache = CacheEngine(
        args.num_layers, args.num_kv_heads // pc.tp_size, args.head_dim, config.block_size,
        num_gpu_blocks, num_cpu_blocks, dtype, config.device,
    )  # fmt: skip
    lora_manager = LoRAManager(model, config.max_loras, torch.device(config.device), dtype, pc)
    for name, path in config.lora_modules:
        lora_manager.add_lora(name, path)
    return ModelRunner(model, cache, config.block_size, Sampler(config.seed), lora_manager)


class LoRARegistry(Protocol):
    """What the engine needs of an executor's adapters: the registered names, and changing them."""

    paths: dict[str, Path]

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
        self.num_gpu_blocks, self.num_cpu_blocks = kv_cache_blocks(config, model_args)
        self.runner = load_model_runner(model_dir, config, self.num_gpu_blocks, self.num_cpu_blocks)
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
