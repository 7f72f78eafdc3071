"""KV cache sizing (engine/memory.py): an explicit budget, CPU's fixed default, and on CUDA what
gpu_memory_utilization leaves after the weights and the measured activations of the largest step."""

from __future__ import annotations

import gc

import pytest
import torch

from clusterft.engine import LLM, EngineConfig, SamplingParams
from clusterft.engine.cache_engine import CacheEngine
from clusterft.engine.memory import DEFAULT_CPU_KV_CACHE_GIB, profile_peak_bytes
from tests.engine.helpers import random_prompts


def block_bytes(engine) -> int:
    args = engine.model_args
    return CacheEngine.block_bytes(args.num_layers, args.num_kv_heads, args.head_dim, 16, torch.float32)


def test_cpu_budget_is_the_explicit_space_or_the_default(llama_dir):
    default = LLM(llama_dir).engine
    assert default.num_gpu_blocks == int(DEFAULT_CPU_KV_CACHE_GIB * 2**30) // block_bytes(default)
    small = LLM(llama_dir, kv_cache_space=0.01).engine
    assert small.num_gpu_blocks == int(0.01 * 2**30) // block_bytes(small)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_profile_step_runs_the_largest_batch(model_dirs, arch):
    """The profile forward (every token of max_num_batched_tokens through every layer, max_num_seqs
    rows of logits) runs on any device; it measures only where the device keeps statistics."""
    engine = LLM(model_dirs[arch], num_gpu_blocks=8, max_num_batched_tokens=300, max_num_seqs=7).engine
    config = EngineConfig(max_num_batched_tokens=300, max_num_seqs=7)
    model = engine.executor.model
    assert profile_peak_bytes(config, model, model.args.num_kv_heads) == 0  # CPU: nothing measured


def test_utilization_is_a_fraction():
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            EngineConfig(gpu_memory_utilization=bad)


@pytest.mark.gpu
def test_gpu_cache_fills_what_utilization_leaves(llama_dir):
    total = torch.cuda.mem_get_info()[1]
    low = LLM(llama_dir, device="cuda", gpu_memory_utilization=0.3).engine
    low_blocks = low.num_gpu_blocks
    cache_bytes = low_blocks * block_bytes(low)
    assert 0.2 * total < cache_bytes < 0.3 * total  # the tiny model's weights are a few MiB
    del low
    gc.collect()  # the engine's KV tensors go with it
    torch.cuda.empty_cache()
    high = LLM(llama_dir, device="cuda", gpu_memory_utilization=0.6)
    assert high.engine.num_gpu_blocks > 1.9 * low_blocks
    outputs = high.generate(random_prompts([20, 40], seed=3), SamplingParams(temperature=0, max_tokens=8))
    assert all(len(o.outputs[0].token_ids) == 8 or o.outputs[0].finish_reason == "stop" for o in outputs)
