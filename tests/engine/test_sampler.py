"""Sampling: exact masks, penalties, seeded reproducibility, logprobs."""

import math

import pytest
import torch

from clusterft.engine import LLM, SamplingParams
from clusterft.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)
from tests.engine.helpers import random_prompts

INF = float("-inf")


def test_top_k_keeps_k_largest_per_row_and_zero_is_off():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k(logits, torch.tensor([2, 0]))
    assert out.tolist() == [[INF, 4.0, 3.0, INF], [1.0, 4.0, 3.0, 2.0]]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: (apply_top_p(logits, torch.tensor([p])) > INF).tolist()[0]  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.75) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]


def test_min_p_drops_tokens_below_fraction_of_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (apply_min_p(logits, torch.tensor([0.5])) > INF).tolist() == [[True, True, False, False]]


def test_penalties_follow_hf_and_openai_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    row = SamplingRow(
        SamplingParams(repetition_penalty=2.0), None, prompt_token_ids=[0], output_token_ids=[1]
    )
    assert apply_penalties(logits, [row]).tolist() == [[1.0, -4.0, 1.0, 1.0]]
    row = SamplingRow(
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), None, [0], output_token_ids=[2, 2, 3]
    )
    assert apply_penalties(logits, [row]).tolist() == [[2.0, -2.0, 0.0, 0.25]]


def test_sampler_greedy_rows_and_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    rows = [SamplingRow(SamplingParams(temperature=0, logprobs=2), None, [], []) for _ in range(2)]
    out = Sampler()(logits, rows)
    token_ids, sampled, top = out.token_ids, out.logprobs, out.top_logprobs
    assert token_ids == [1, 0] and not out.errors
    expected = torch.log_softmax(logits, -1)
    assert sampled == pytest.approx([expected[0, 1].item(), expected[1, 0].item()])
    assert list(top[0]) == [1, 2] and top[0][2] == pytest.approx(expected[0, 2].item())


def test_seeded_rows_are_reproducible_and_independent_of_batch():
    logits = torch.zeros(3, 50)
    params = SamplingParams(temperature=1.0, seed=7)

    def draw(batch_rows):
        rows = [SamplingRow(p, torch.Generator().manual_seed(p.seed) if p.seed is not None else None, [], [])
                for p in batch_rows]  # fmt: skip
        return Sampler(seed=0)(logits[: len(rows)], rows).token_ids[0]

    first = draw([params])
    assert draw([params, SamplingParams(temperature=1.0), SamplingParams(temperature=0.5)]) == first
    assert draw([SamplingParams(temperature=1.0, seed=8)]) != first


def test_top_k_one_sampling_is_greedy_and_distribution_roughly_follows_probs():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    rows = [SamplingRow(SamplingParams(temperature=1.0), None, [], [])] * 4000
    token_ids = Sampler(seed=0)(logits, rows).token_ids
    freq = torch.bincount(torch.tensor(token_ids), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    rows = [SamplingRow(SamplingParams(temperature=1.0, top_k=1), None, [], [])] * 4000
    assert set(Sampler(seed=0)(logits, rows).token_ids) == {0}


def test_engine_seeded_sampling_reproducible_across_runs_and_batches(llama_dir):
    prompt = random_prompts([12], seed=9)[0]
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=123, max_tokens=12, logprobs=1)
    alone = LLM(llama_dir, num_gpu_blocks=32).generate(prompt, params)[0].outputs[0]
    others = random_prompts([5, 30], seed=10)
    batch = LLM(llama_dir, num_gpu_blocks=32).generate(
        [*others, prompt], [SamplingParams(temperature=1.0, max_tokens=12)] * 2 + [params]
    )
    assert batch[2].outputs[0].token_ids == alone.token_ids
    assert len(alone.logprobs) == len(alone.token_ids)
    total = sum(lp[t] for lp, t in zip(alone.logprobs, alone.token_ids, strict=True))
    assert math.isclose(alone.cumulative_logprob, total, rel_tol=1e-5)


def test_n_with_seed_gives_distinct_reproducible_completions(llama_dir):
    prompt = random_prompts([20], seed=11)[0]
    params = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=10)
    a = LLM(llama_dir, num_gpu_blocks=32).generate(prompt, params)[0]
    b = LLM(llama_dir, num_gpu_blocks=32).generate(prompt, params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


def test_best_of_returns_n_best_by_cumulative_logprob(llama_dir):
    prompt = random_prompts([20], seed=12)[0]
    out = LLM(llama_dir, num_gpu_blocks=32).generate(
        prompt, SamplingParams(temperature=1.0, n=2, best_of=4, seed=1, max_tokens=8)
    )[0]
    assert len(out.outputs) == 2 and out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob


def test_row_whose_sampling_fails_gets_an_error_and_the_others_their_tokens_alone():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    bad = SamplingParams(temperature=1.0)
    object.__setattr__(bad, "logprobs", 21)  # more than the vocab: fails after the batch's random draw
    params = [
        bad,
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(temperature=1.0, seed=7, logprobs=1),
    ]

    def rows(batch):
        return [SamplingRow(p, torch.Generator().manual_seed(p.seed) if p.seed is not None else None, [], [])
                for p in batch]  # fmt: skip

    out = Sampler(seed=0)(logits, rows(params))
    assert list(out.errors) == [0] and out.errors[0].startswith("RuntimeError: ")
    assert (out.token_ids[0], out.logprobs[0], out.top_logprobs[0]) == (None, None, None)
    for i in (1, 2):
        alone = Sampler(seed=0)(logits[i : i + 1], rows(params[i : i + 1]))
        assert out.token_ids[i] == alone.token_ids[0] and out.logprobs[i] == alone.logprobs[0]
        assert out.top_logprobs[i] == alone.top_logprobs[0]
