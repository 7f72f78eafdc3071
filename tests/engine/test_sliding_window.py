"""Sliding-window attention (Mistral's `sliding_window`): each token attends to the last W positions
only. The engine must generate what HF generates through every path (prefill, chunked prefill over a
cached prefix, decode, prefix-cache hits); a model that mixes windowed and full layers is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from clusterft.engine import LLM, SamplingParams
from tests.engine.helpers import hf_greedy, random_prompts

WINDOW = 8
PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def derive(src, dst, **config_changes):
    """A copy of the model dir `src` with its config.json changed (the weights are Mistral's too)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def mistral_dir(llama_dir, tmp_path_factory):
    return derive(
        llama_dir,
        tmp_path_factory.mktemp("models") / "mistral-window",
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        sliding_window=WINDOW,
    )


def hf_reference(model_dir, prompts):
    return [hf_greedy(model_dir, p, 20, eos_token_id=None, min_new_tokens=20) for p in prompts]


def test_the_window_changes_what_hf_generates(mistral_dir, llama_dir):
    """Guards the tests below: with W=8 these prompts continue differently than with full attention,
    so an engine that ignored the window could not match HF."""
    prompts = random_prompts([17, 33], seed=11)
    assert hf_reference(mistral_dir, prompts) != hf_reference(llama_dir, prompts)


@pytest.mark.parametrize("batched_tokens", [2048, 16])  # whole prefills; 16: chunks over a cached prefix
def test_windowed_generation_matches_hf(mistral_dir, batched_tokens):
    prompts = random_prompts([3, 17, 33, 50], seed=11)
    llm = LLM(mistral_dir, num_gpu_blocks=64, max_num_batched_tokens=batched_tokens)
    outputs = llm.generate(prompts, PARAMS)
    assert [o.outputs[0].token_ids for o in outputs] == hf_reference(mistral_dir, prompts)


def test_prefix_cache_hits_keep_the_window(mistral_dir):
    prefix = random_prompts([40], seed=12)[0]
    prompts = [prefix + tail for tail in random_prompts([3, 9], seed=13)]
    llm = LLM(mistral_dir, num_gpu_blocks=64)
    llm.generate(prompts[:1], PARAMS)
    outputs = llm.generate(prompts[1:], PARAMS)
    assert llm.engine.get_stats().prefix_cache_hits > 0
    assert [o.outputs[0].token_ids for o in outputs] == hf_reference(mistral_dir, prompts[1:])


def test_mixed_window_and_full_layers_are_refused(qwen2_dir, tmp_path):
    mixed = derive(
        qwen2_dir,
        tmp_path / "qwen2-mixed",
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=2,
        layer_types=["full_attention"] * 2 + ["sliding_attention"] * 2,
    )
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention layers"):
        LLM(mixed, num_gpu_blocks=16)
