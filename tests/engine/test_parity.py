"""Greedy (and beam search) outputs equal HF `generate` token for token, through every engine path."""

import json
import shutil

import pytest
import torch

from clusterft.engine import LLM, SamplingParams
from tests.engine.helpers import hf_greedy, hf_model, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24)
LENGTHS = [3, 17, 33, 50]


def assert_matches_hf(model_dir, prompts, outputs, max_tokens=24):
    for prompt, out in zip(prompts, outputs, strict=True):
        for completion in out.outputs:
            assert completion.token_ids == hf_greedy(model_dir, prompt, max_tokens)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_hf(model_dirs, arch):
    prompts = random_prompts(LENGTHS, seed=1)
    outputs = LLM(model_dirs[arch], num_gpu_blocks=64).generate(prompts, GREEDY)
    assert_matches_hf(model_dirs[arch], prompts, outputs)
    assert all(o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in outputs)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_prefill_matches_hf(model_dirs, arch):
    prompts = random_prompts([45, 60, 7], seed=2)
    llm = LLM(model_dirs[arch], num_gpu_blocks=64, max_num_batched_tokens=16)
    assert_matches_hf(model_dirs[arch], prompts, llm.generate(prompts, GREEDY))


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forced_preemption_matches_hf(model_dirs, arch, mode):
    prompts = random_prompts([40, 42, 44, 46], seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(model_dirs[arch], num_gpu_blocks=12, num_cpu_blocks=16, preemption_mode=mode,
              enable_prefix_caching=False)  # fmt: skip
    outputs = llm.generate(prompts, params)
    stats = llm.engine.get_stats()
    assert getattr(stats, f"num_preemptions_{mode}") > 0
    for prompt, out in zip(prompts, outputs, strict=True):
        model = hf_model(model_dirs[arch])
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             min_new_tokens=0)[0, len(prompt):].tolist()  # fmt: skip
        assert out.outputs[0].token_ids == ref
    assert llm.engine.kv_cache_manager.block_pool.num_free_blocks == 12


def test_compacted_blocks_match_hf(model_dirs):
    """Short requests finish and leave holes below the long ones, whose blocks move down into them
    (KVCacheManager.compact) while they decode: the tokens still equal HF's."""
    prompts = random_prompts([20, 33, 18, 40, 25, 30], seed=9)
    lengths = [2, 40, 3, 40, 2, 40]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm = LLM(model_dirs["llama"], num_gpu_blocks=64, enable_prefix_caching=False)
    outputs = llm.generate(prompts, params)
    assert llm.engine.kv_cache_manager.num_compaction_moves > 0
    model = hf_model(model_dirs["llama"])
    for prompt, n, out in zip(prompts, lengths, outputs, strict=True):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             min_new_tokens=0)[0, len(prompt):].tolist()  # fmt: skip
        assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_cache_hits_match_hf(model_dirs, arch):
    prefix = random_prompts([40], seed=4)[0]
    prompts = [prefix + tail for tail in random_prompts([3, 9, 20], seed=5)]
    llm = LLM(model_dirs[arch], num_gpu_blocks=64)
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    assert first[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in rest] == [32, 32]  # two full blocks of the 40-token prefix
    assert_matches_hf(model_dirs[arch], prompts, first + rest)
    stats = llm.engine.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (43 + 49 + 60, 32 + 32)
    assert stats.prefix_cache_hit_rate == 64 / 152


def test_n_greedy_copies_match_hf(model_dirs):
    prompts = random_prompts([21, 5], seed=6)
    outputs = LLM(model_dirs["qwen2"], num_gpu_blocks=64).generate(
        prompts, SamplingParams(temperature=0, n=3, max_tokens=24)
    )
    assert [len(o.outputs) for o in outputs] == [3, 3]
    assert [c.index for c in outputs[0].outputs] == [0, 1, 2]
    assert_matches_hf(model_dirs["qwen2"], prompts, outputs)


@pytest.mark.parametrize(
    ("arch", "length_penalty", "early_stopping"),
    [("llama", 1.0, False), ("qwen2", 0.5, True), ("llama", 2.0, "never")],
)
def test_beam_search_matches_hf(model_dirs, arch, length_penalty, early_stopping):
    prompts = random_prompts([9, 30], seed=7)
    params = SamplingParams(temperature=0, use_beam_search=True, best_of=3, n=2, max_tokens=20,
                            length_penalty=length_penalty, early_stopping=early_stopping)  # fmt: skip
    llm = LLM(model_dirs[arch], num_gpu_blocks=64)
    outputs = llm.generate(prompts, params)
    model = hf_model(model_dirs[arch])
    eos = set(model.generation_config.eos_token_id)
    for prompt, out in zip(prompts, outputs, strict=True):
        ref = model.generate(
            torch.tensor([prompt]), num_beams=3, num_return_sequences=2, max_new_tokens=20, do_sample=False,
            length_penalty=length_penalty, early_stopping=early_stopping, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        for completion, seq, score in zip(out.outputs, ref.sequences, ref.sequences_scores, strict=True):
            tokens = seq[len(prompt) :].tolist()
            cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
            assert completion.token_ids == tokens[:cut]
            assert completion.cumulative_logprob == pytest.approx(float(score), abs=1e-5)
    assert llm.engine.kv_cache_manager.block_pool.num_free_blocks == 64


@pytest.mark.gpu
def test_greedy_matches_hf_on_cuda(model_dirs):
    prompts = random_prompts(LENGTHS, seed=8)
    outputs = LLM(model_dirs["qwen2"], num_gpu_blocks=64, device="cuda").generate(prompts, GREEDY)
    assert_matches_hf(model_dirs["qwen2"], prompts, outputs)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    ],
    ids=["linear", "llama3"],
)  # fmt: skip
def test_rope_scaling_from_config_matches_hf(llama_dir, tmp_path, rope):
    scaled = tmp_path / "llama-scaled"
    shutil.copytree(llama_dir, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = rope
    (scaled / "config.json").write_text(json.dumps(config))
    prompts = random_prompts([30, 70], seed=9)
    outputs = LLM(scaled, num_gpu_blocks=32).generate(prompts, GREEDY)
    assert_matches_hf(scaled, prompts, outputs)
    default = LLM(llama_dir, num_gpu_blocks=32).generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] != [o.outputs[0].token_ids for o in default]


def test_weight_version_bump_misses_the_prefix_cache(llama_dir):
    llm = LLM(llama_dir, num_gpu_blocks=32)
    prompt = random_prompts([40], seed=10)[0]
    llm.generate(prompt, GREEDY)
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 32
    llm.engine.weight_version = 1  # what the controller does on promotion
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0
