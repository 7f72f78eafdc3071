"""How many bytes of KV cache a worker may allocate, decided after its weights are loaded.

    explicit kv_cache_space (GiB)  ─► that
    CPU                            ─► DEFAULT_CPU_KV_CACHE_GIB (as vLLM's CPU backend: RAM is shared
                                      with everything else on the host, so a fixed budget)
    CUDA                           ─► gpu_memory_utilization × device total
                                        − memory in use now (weights, other processes)
                                        − the peak activations of the largest step (measured)

The peak is measured by one forward pass over `max_num_batched_tokens` tokens in a scratch cache,
with `max_num_seqs` rows of logits: what the biggest step the scheduler may send needs on top of
the weights. vLLM's profile run does the same.
"""

from __future__ import annotations

import torch

from clusterft.engine.attention import AttentionMetadata, PrefillChunk
from clusterft.engine.config import EngineConfig
from clusterft.engine.models import LlamaForCausalLM

DEFAULT_CPU_KV_CACHE_GIB = 1.0


def kv_cache_budget(config: EngineConfig, model: LlamaForCausalLM, num_kv_heads: int) -> int:
    """Bytes of device KV cache this worker may allocate (its share of every block: `num_kv_heads`
    is the heads it holds)."""
    if config.kv_cache_space is not None:
        return int(config.kv_cache_space * 2**30)
    if config.device != "cuda":
        return int(DEFAULT_CPU_KV_CACHE_GIB * 2**30)
    device = next(model.parameters()).device
    peak = profile_peak_bytes(config, model, num_kv_heads)
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * config.gpu_memory_utilization) - (total - free) - peak
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: gpu_memory_utilization {config.gpu_memory_utilization} "
            f"of {total / 2**30:.1f} GiB, {(total - free) / 2**30:.2f} GiB in use after loading the model, "
            f"{peak / 2**30:.2f} GiB for the activations of a {config.max_num_batched_tokens}-token step; "
            "raise gpu_memory_utilization, lower max_num_batched_tokens, or use more tensor-parallel "
            "workers"
        )
    return budget


def profile_peak_bytes(config: EngineConfig, model: LlamaForCausalLM, num_kv_heads: int) -> int:
    """Device memory one forward of the largest step allocates beyond what is allocated now (0 on a
    device without memory statistics)."""
    device = next(model.parameters()).device
    num_tokens = config.max_num_batched_tokens
    block_size = config.block_size
    num_blocks = -(-num_tokens // block_size)
    dtype = next(model.parameters()).dtype
    head_dim = model.args.head_dim
    measured = device.type == "cuda"
    if measured:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    # (num_blocks, kvh, block_size, hd) per layer, as CacheEngine lays it out; freed on return
    caches = [
        (
            torch.zeros(num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype, device=device),
            torch.zeros(num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype, device=device),
        )
        for _ in range(model.args.num_layers)
    ]
    positions = torch.arange(num_tokens, device=device) % model.args.max_position_embeddings
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        num_decodes=0,
        decode_blocks=[],
        prefills=[PrefillChunk(0, num_tokens, 0, None)],
        sliding_window=model.args.sliding_window,
    )
    input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    with torch.inference_mode():
        hidden = model(input_ids, positions, caches, meta)
        model.compute_logits(hidden[-config.max_num_seqs :])
    if not measured:
        return 0
    torch.cuda.synchronize(device)
    scratch = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in caches)
    return torch.cuda.max_memory_allocated(device) - before - scratch  # the scratch cache is KV
