"""int8 weight-only quantization and engine config errors (the async front end: test_async_llm.py)."""

import pytest
import torch

from clusterft.engine import LLM, EngineConfig, SamplingParams
from clusterft.hf.quant import dequantize_int8, quantize_int8
from tests.engine.helpers import random_prompts


def test_int8_roundtrip_error_is_bounded_by_half_a_step():
    w = torch.randn(8, 40)
    q, scales = quantize_int8(w, group_size=16)  # 40 = 2 full groups + a partial one
    assert q.dtype == torch.int8 and scales.shape == (8, 3)
    err = (dequantize_int8(q, scales, 16, torch.float32) - w).abs()
    step = scales.repeat_interleave(16, dim=1)[:, :40]
    assert bool((err <= step / 2 + 1e-6).all())


def model_bytes(model):
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        if getattr(module, "qweight", None) is not None:
            tensors += [module.qweight, module.scales]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def test_int8_shrinks_weights_and_keeps_greedy_agreement(llama_dir):
    prompts = random_prompts([12, 30, 25], seed=40)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    fp32 = LLM(llama_dir, num_gpu_blocks=32)
    int8 = LLM(llama_dir, num_gpu_blocks=32, quantization="int8", quant_group_size=64)
    assert int8.engine.model.lm_head.weight is not None  # lm_head excluded by default
    assert int8.engine.model.layers[0].self_attn.qkv_proj.qweight.dtype == torch.int8
    assert model_bytes(int8.engine.model) < 0.6 * model_bytes(fp32.engine.model)
    ref = [o.outputs[0].token_ids for o in fp32.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in int8.generate(prompts, params)]
    # Agreement on the first tokens: later ones diverge once one token differs.
    first = [r[0] == g[0] for r, g in zip(ref, got, strict=True)]
    agree = sum(a == b for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True)) / 48
    assert all(first) and agree >= 0.5


def test_config_and_request_errors_name_the_field_and_fix(llama_dir):
    with pytest.raises(ValueError, match="block_size must be a positive power of two"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="best_of \\(1\\) must be >= n \\(2\\)"):
        SamplingParams(n=2, best_of=1)
    llm = LLM(llama_dir, num_gpu_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match="prompt has 80 tokens but max_model_len is 64"):
        llm.generate(list(range(7, 87)))
