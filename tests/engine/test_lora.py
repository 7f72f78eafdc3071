"""Multi-LoRA: peft adapters served by name, mixed with the base model in one batch, LRU-bounded."""

import pytest
import torch

from clusterft.engine import LLM, SamplingParams
from tests.engine.helpers import hf_greedy, random_prompts


def peft_greedy(peft_model, prompt, max_new_tokens):
    with torch.inference_mode():
        out = peft_model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False
        )
    tokens = out[0, len(prompt) :].tolist()
    eos = set(peft_model.generation_config.eos_token_id)
    cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut]


def run_mixed_batch(llm, prompts, lora_names, params):
    engine = llm.engine
    for i, (prompt, name) in enumerate(zip(prompts, lora_names, strict=True)):
        engine.add_request(f"r{i}", prompt, params, lora_name=name)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    return [finished[f"r{i}"] for i in range(len(prompts))]


def test_base_and_two_adapters_in_one_batch_match_peft(llama_dir, adapters):
    prompts = random_prompts([9, 14, 20, 11], seed=30)
    names = [None, "a", "b", "a"]
    llm = LLM(llama_dir, num_gpu_blocks=64, lora_modules=[(n, str(d)) for n, (d, _) in adapters.items()])
    params = SamplingParams(temperature=0, max_tokens=16)
    outputs = run_mixed_batch(llm, prompts, names, params)
    assert llm.engine.lora_manager.num_loads == 2
    for prompt, name, tokens in zip(prompts, names, outputs, strict=True):
        ref = hf_greedy(llama_dir, prompt, 16) if name is None else peft_greedy(adapters[name][1], prompt, 16)
        assert tokens == ref
    assert outputs[1] != hf_greedy(llama_dir, prompts[1], 16)  # the adapter changes the output


def test_adapter_prefix_cache_is_separate_from_base(llama_dir, adapters):
    llm = LLM(llama_dir, num_gpu_blocks=64, lora_modules=[("a", str(adapters["a"][0]))])
    prompt = random_prompts([40], seed=31)[0]
    params = SamplingParams(temperature=0, max_tokens=4)
    llm.generate(prompt, params)
    out = llm.generate(prompt, params, lora_name="a")[0]
    assert out.num_cached_tokens == 0  # base-model KV is not reused for the adapter
    assert llm.generate(prompt, params, lora_name="a")[0].num_cached_tokens == 32


def test_lru_bound_on_resident_adapters(llama_dir, adapters):
    llm = LLM(
        llama_dir,
        num_gpu_blocks=64,
        max_loras=1,
        lora_modules=[(n, str(d)) for n, (d, _) in adapters.items()],
    )
    prompts = random_prompts([9, 14, 12], seed=32)
    names = ["a", "b", "a"]
    outputs = run_mixed_batch(llm, prompts, names, SamplingParams(temperature=0, max_tokens=8))
    manager = llm.engine.lora_manager
    assert len(manager.resident) == 1 and manager.num_loads >= 2
    for prompt, name, tokens in zip(prompts, names, outputs, strict=True):
        assert tokens == peft_greedy(adapters[name][1], prompt, 8)


def test_list_loras_follows_add_and_remove(llama_dir, adapters):
    llm = LLM(llama_dir, num_gpu_blocks=16, lora_modules=[("a", str(adapters["a"][0]))])
    assert llm.engine.list_loras() == ["a"]
    llm.engine.add_lora("b", adapters["b"][0])
    assert llm.engine.list_loras() == ["a", "b"]
    llm.engine.remove_lora("a")
    assert llm.engine.list_loras() == ["b"]
    with pytest.raises(ValueError, match=r"unknown lora_name 'a'"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2), lora_name="a")


def test_unknown_adapter_is_a_clear_error(llama_dir):
    llm = LLM(llama_dir, num_gpu_blocks=16)
    with pytest.raises(ValueError, match=r"unknown lora_name 'nope'.*add_lora"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2), lora_name="nope")
