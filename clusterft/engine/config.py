"""EngineConfig: every knob of the engine, validated once, frozen.

Values the engine derives at start-up (the number of KV blocks when only a memory budget is given,
`max_model_len` when taken from the model) are returned by the engine, never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PreemptionMode = Literal["recompute", "swap", "auto"]
AttentionBackend = Literal["auto", "fused", "torch"]


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_gpu_blocks: int | None = None  # KV blocks on the device; None: sized from the memory budget
    kv_cache_space: float | None = None  # GiB of device KV blocks; None: 1 GiB on CPU, on CUDA what
    # gpu_memory_utilization leaves after the weights and the largest step's activations (memory.py)
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's memory this worker may use in all
    swap_space: float = 0.0  # GiB of CPU KV blocks that preempted requests can be swapped to
    num_cpu_blocks: int | None = None  # overrides swap_space (tests pin exact pool sizes)
    max_num_seqs: int = 128  # requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_model_len: int | None = None  # prompt + output limit; None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    preemption_mode: PreemptionMode = "auto"  # auto: swap while the CPU pool has room, else recompute
    enable_prefix_caching: bool = True
    max_loras: int = 4  # adapters resident at once (LRU beyond)
    max_cpu_loras: int | None = None  # adapters whose checked weights stay in host memory; None: max_loras
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, peft adapter dir) registered at start-up
    quantization: Literal["int8"] | None = None  # weight-only int8 on linear layers
    quant_group_size: int = 128
    quant_exclude_modules: tuple[str, ...] = ("lm_head",)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0  # seeds the sampler of requests without their own seed
    # Decode attention: fused = the C++ CPU kernel (JIT-built once), torch = the reference path;
    # auto = fused on CPU when it builds (else torch, with one warning), torch on CUDA.
    attention_backend: AttentionBackend = "auto"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two (e.g. 16), got {self.block_size}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(
                f"num_gpu_blocks must be >= 1 (or None to size from kv_cache_space), "
                f"got {self.num_gpu_blocks}"
            )
        if self.kv_cache_space is not None and self.kv_cache_space <= 0:
            raise ValueError(
                f"kv_cache_space must be > 0 GiB (or None to size it), got {self.kv_cache_space}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.swap_space < 0 or (self.num_cpu_blocks is not None and self.num_cpu_blocks < 0):
            raise ValueError("swap_space (GiB) and num_cpu_blocks must be >= 0")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs and not self.enable_chunked_prefill:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) without chunked prefill; raise it or set enable_chunked_prefill=True"
            )
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.preemption_mode not in ("recompute", "swap", "auto"):
            raise ValueError(f"preemption_mode must be recompute|swap|auto, got {self.preemption_mode!r}")
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization must be None or 'int8', got {self.quantization!r}")
        if self.quant_group_size < 1:
            raise ValueError(f"quant_group_size must be >= 1, got {self.quant_group_size}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): every "
                "resident adapter is also kept in host memory; raise it or leave it unset"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32|bfloat16|float16, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.attention_backend not in ("auto", "fused", "torch"):
            raise ValueError(f"attention_backend must be auto|fused|torch, got {self.attention_backend!r}")
        object.__setattr__(self, "lora_modules", tuple(tuple(m) for m in self.lora_modules))
        object.__setattr__(self, "quant_exclude_modules", tuple(self.quant_exclude_modules))
