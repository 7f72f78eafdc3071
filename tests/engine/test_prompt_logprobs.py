"""prompt_logprobs: each prompt token's logprob given its prefix, equal to an HF forward's log-softmax,
through chunked prefill, preemption and prefix-cache hits (which give the cold request's numbers)."""

from collections import Counter

import pytest
import torch

from clusterft.engine import LLM, SamplingParams
from tests.engine.helpers import hf_model, random_prompts


def hf_prompt_logprobs(model_dir, prompt: list[int]) -> torch.Tensor:
    """(P - 1, V): log-softmax of HF's logits at positions 0 .. P-2 (each scores the next token)."""
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def assert_matches_hf(model_dir, prompt: list[int], got, k: int, atol: float = 1e-5) -> None:
    ref = hf_prompt_logprobs(model_dir, prompt)
    assert len(got) == len(prompt) and got[0] is None
    for pos, entry in enumerate(got[1:], start=1):
        row, token = ref[pos - 1], prompt[pos]
        want_rank = int((row > row[token]).sum()) + 1
        assert abs(entry[token].logprob - float(row[token])) < atol, (pos, entry[token], float(row[token]))
        assert entry[token].rank == want_rank
        top_values, top_ids = row.topk(k)
        top = [t for t in entry if t != token or entry[t].rank <= k]
        assert len(top) == k, (pos, entry)
        assert sorted(top) == sorted(top_ids.tolist())
        for t, value in zip(top_ids.tolist(), top_values.tolist(), strict=True):
            assert abs(entry[t].logprob - value) < atol


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_logprobs_match_hf_forward(model_dirs, arch):
    prompts = random_prompts([5, 19, 40], seed=11)
    llm = LLM(model_dirs[arch], num_gpu_blocks=64)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_matches_hf(model_dirs[arch], prompt, out.prompt_logprobs, k=3)
        assert out.prompt_token_ids == prompt


def test_no_prompt_logprobs_unless_asked(llama_dir):
    [out] = LLM(llama_dir, num_gpu_blocks=16).generate([[5, 6, 7]], SamplingParams(max_tokens=1))
    assert out.prompt_logprobs is None


def test_one_token_prompt_and_k_zero(llama_dir):
    llm = LLM(llama_dir, num_gpu_blocks=16)
    [one] = llm.generate([[9]], SamplingParams(max_tokens=1, prompt_logprobs=2))
    assert one.prompt_logprobs == [None]
    prompt = random_prompts([12], seed=4)[0]
    [out] = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))
    # k = 0: the prompt token's own entry only
    assert all(set(e) == {t} for e, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True))
    assert_matches_hf(llama_dir, prompt, out.prompt_logprobs, k=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_prefill_spans_chunks(model_dirs, arch):
    """A 16-token budget cuts 45- and 60-token prompts into chunks: each brings its positions."""
    prompts = random_prompts([45, 60, 7], seed=12)
    llm = LLM(model_dirs[arch], num_gpu_blocks=64, max_num_batched_tokens=16)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2))
    assert llm.engine.num_steps > 60 // 16
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_matches_hf(model_dirs[arch], prompt, out.prompt_logprobs, k=2)


def test_cold_and_warm_prefix_cache_identical(llama_dir):
    """The warm request hits the KV prefix cache and returns the cold one's numbers bit for bit; a
    longer prompt sharing the prefix computes its own (it is not memoized) and still matches HF."""
    prompt = random_prompts([50], seed=13)[0]
    llm = LLM(llama_dir, num_gpu_blocks=64, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=5)
    [cold] = llm.generate([prompt], params)
    assert cold.num_cached_tokens == 0
    [warm] = llm.generate([prompt], params)
    assert warm.num_cached_tokens == 48  # three full blocks of 16 hit; the last token is recomputed
    assert warm.prompt_logprobs == cold.prompt_logprobs  # exact: float == on every logprob and rank
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    # A smaller k is the cold request's top-k cut, still from the memo (a cache hit).
    [fewer] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))
    assert fewer.num_cached_tokens == 48
    for small, big, token in zip(
        fewer.prompt_logprobs[1:], cold.prompt_logprobs[1:], prompt[1:], strict=True
    ):
        assert small[token] == big[token]
        assert [small[t] for t in small if small[t].rank <= 2] == [big[t] for t in big if big[t].rank <= 2]
    # A larger k than memoized cannot come from the memo: the prompt runs again (no cache hit).
    [more] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=8))
    assert more.num_cached_tokens == 0
    assert_matches_hf(llama_dir, prompt, more.prompt_logprobs, k=8)
    longer = prompt + random_prompts([9], seed=14)[0]
    [other] = llm.generate([longer], params)
    assert other.num_cached_tokens == 0
    assert_matches_hf(llama_dir, longer, other.prompt_logprobs, k=5)
    # A request without prompt_logprobs still hits the blocks the others left.
    [plain] = llm.generate([longer], SamplingParams(temperature=0, max_tokens=1))
    assert plain.num_cached_tokens == 48


def test_warm_after_a_request_without_prompt_logprobs(llama_dir):
    """Blocks cached by a request that did not ask give no logits: the asking one computes them all,
    so its numbers are a cold request's, and the next one is served from the memo."""
    prompt = random_prompts([40], seed=15)[0]
    llm = LLM(llama_dir, num_gpu_blocks=64)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    [first] = llm.generate([prompt], params)
    assert first.num_cached_tokens == 0
    assert_matches_hf(llama_dir, prompt, first.prompt_logprobs, k=1)
    [second] = llm.generate([prompt], params)
    assert second.num_cached_tokens == 32 and second.prompt_logprobs == first.prompt_logprobs
    llm.engine.reset_prefix_cache()  # new weights or a reused adapter name: memo goes too
    [third] = llm.generate([prompt], params)
    assert third.num_cached_tokens == 0


def count_scored_entries(llm: LLM) -> Counter:
    """request id -> prompt entries the model runner produced, repeats included (a spy on the step)."""
    scored = Counter()
    execute = llm.engine.executor.execute_model

    def counting(so):
        out = execute(so)
        for req_id, (_, entries) in out.prompt_logprobs.items():
            scored[req_id] += len(entries)
        return out

    llm.engine.executor.execute_model = counting
    return scored


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_preemption_never_repeats_entries(model_dirs, arch, mode):
    """Preemption in prefill chunks and in decode: a recomputed prompt is scored again by the model
    runner (counted here), a swapped one carries on; each entry is still emitted once and matches HF."""
    prompts = random_prompts([40, 42, 44, 46], seed=16)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
    llm = LLM(model_dirs[arch], num_gpu_blocks=12, num_cpu_blocks=16, preemption_mode=mode,
              max_num_batched_tokens=32, enable_prefix_caching=False)  # fmt: skip
    scored = count_scored_entries(llm)
    outputs = llm.generate(prompts, params)
    assert getattr(llm.engine.get_stats(), f"num_preemptions_{mode}") > 0
    num_entries = sum(len(p) - 1 for p in prompts)
    if mode == "recompute":
        assert sum(scored.values()) > num_entries, scored  # some prompt was scored twice
    else:
        assert sum(scored.values()) == num_entries, scored
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_matches_hf(model_dirs[arch], prompt, out.prompt_logprobs, k=2)
        assert len(out.outputs[0].token_ids) == 24


def test_preemption_mid_prefill_keeps_the_first_entries(llama_dir):
    """A request preempted (recompute) between prefill chunks scores its first chunks again when it
    comes back: the repeats are dropped, so each prompt has exactly one entry per token."""
    prompts = random_prompts([60, 62, 64, 58], seed=16)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    llm = LLM(llama_dir, num_gpu_blocks=12, preemption_mode="recompute", max_num_batched_tokens=16,
              enable_prefix_caching=False)  # fmt: skip
    scored = count_scored_entries(llm)
    outputs = llm.generate(prompts, params)
    assert llm.engine.get_stats().num_preemptions_recompute > 0
    assert sum(scored.values()) > sum(len(p) - 1 for p in prompts), scored
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_matches_hf(llama_dir, prompt, out.prompt_logprobs, k=1)


def test_parallel_sampling_shares_prompt_logprobs(llama_dir):
    prompt = random_prompts([30], seed=17)[0]
    [out] = LLM(llama_dir, num_gpu_blocks=64).generate(
        [prompt], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=3, prompt_logprobs=1)
    )
    assert len(out.outputs) == 3
    assert_matches_hf(llama_dir, prompt, out.prompt_logprobs, k=1)


def test_bad_prompt_logprobs_values(llama_dir):
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer >= 0 or None"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs are not supported with use_beam_search"):
        SamplingParams(use_beam_search=True, temperature=0, n=2, prompt_logprobs=1)
    llm = LLM(llama_dir, num_gpu_blocks=16)
    vocab = llm.engine.model_args.vocab_size
    with pytest.raises(ValueError, match=rf"prompt_logprobs must be in \[0, {vocab}\]"):
        llm.generate([[1, 2]], SamplingParams(prompt_logprobs=vocab + 1))


def test_long_chunks_are_scored_a_few_rows_at_a_time(llama_dir, monkeypatch):
    """Logits of a chunk's prompt positions are computed in slices of PROMPT_LOGITS_ROWS: the slices
    (5 rows here, inside 16-token chunks) join up to one entry per token, equal to HF's."""
    import clusterft.engine.model_runner as model_runner

    monkeypatch.setattr(model_runner, "PROMPT_LOGITS_ROWS", 5)
    prompt = random_prompts([45], seed=18)[0]
    llm = LLM(llama_dir, num_gpu_blocks=64, max_num_batched_tokens=16)
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))
    assert_matches_hf(llama_dir, prompt, out.prompt_logprobs, k=2)


def test_tensor_parallel_shards_score_the_prompt_like_hf(llama_dir):
    """Two shards (threads standing in for worker actors, as in test_tensor_parallel): rank 0's
    prompt logprobs, from its replicated lm_head over all-reduced hidden states, match HF."""
    from tests.engine.test_tensor_parallel import ThreadExecutor

    llm = LLM(llama_dir, num_gpu_blocks=64, max_num_batched_tokens=16, executor_factory=ThreadExecutor)
    prompt = random_prompts([37], seed=19)[0]
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))
    assert_matches_hf(llama_dir, prompt, out.prompt_logprobs, k=3)
