"""LLMEngine at its edge: requests the model can't serve are refused at add_request, and a request
that still fails inside a step is aborted alone, with the error in its output, while the others run on."""

import pytest

from clusterft.engine import LLMEngine, SamplingParams
from tests.engine.helpers import random_prompts

PROMPT, OTHER_PROMPT = random_prompts([12, 9], seed=50)
GOOD = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)  # seeded: batch-independent


def run_to_completion(engine):
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


@pytest.fixture(scope="module")
def good_alone(llama_dir):
    engine = LLMEngine(llama_dir, num_gpu_blocks=32)
    engine.add_request("good", PROMPT, GOOD)
    return run_to_completion(engine)["good"].outputs[0].token_ids


MODEL_BOUNDS = [
    (
        lambda vocab: {"top_k": vocab + 1},
        r"top_k must be -1, 0 \(off\) or in \[1, {vocab}\] \(the model's vocab",
    ),
    (lambda vocab: {"logprobs": vocab + 1}, r"logprobs must be in \[0, {vocab}\] \(the model's vocab"),
    (lambda vocab: {"seed": 2**64 - 1, "n": 2}, r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 1\]"),
    (
        lambda vocab: {"use_beam_search": True, "temperature": 0, "best_of": vocab},
        r"beam width \(best_of or n\) must be <= \d+ for this model \(vocab of {vocab}",
    ),
]


@pytest.mark.parametrize(("bad", "message"), MODEL_BOUNDS, ids=["top_k", "logprobs", "seed", "beam_width"])
def test_params_the_model_cannot_serve_are_refused_at_add_request(llama_dir, good_alone, bad, message):
    engine = LLMEngine(llama_dir, num_gpu_blocks=32)
    vocab = engine.model_args.vocab_size
    engine.add_request("good", PROMPT, GOOD)
    engine.step()
    with pytest.raises(ValueError, match=message.format(vocab=vocab)):
        engine.add_request("bad", OTHER_PROMPT, SamplingParams(**bad(vocab)))
    finished = run_to_completion(engine)
    assert list(finished) == ["good"] and finished["good"].outputs[0].token_ids == good_alone


def slip_past_validation(params, **fields):
    """A field the edge's checks let through: what a missed bound looks like inside the step."""
    for name, value in fields.items():
        object.__setattr__(params, name, value)


@pytest.mark.parametrize(
    ("n", "field"),
    [(1, "top_k"), (2, "top_k"), (1, "logprobs")],  # logprobs fails after the batch drew its random numbers
)
def test_request_whose_sampling_fails_is_aborted_alone(llama_dir, good_alone, n, field):
    engine = LLMEngine(llama_dir, num_gpu_blocks=32)
    bad = SamplingParams(temperature=1.0, n=n, max_tokens=8)
    engine.add_request("bad", OTHER_PROMPT, bad)
    engine.add_request("good", PROMPT, GOOD)
    slip_past_validation(bad, **{field: engine.model_args.vocab_size + 1})
    finished = run_to_completion(engine)
    failed = finished["bad"]
    assert [(c.index, c.finish_reason, c.token_ids) for c in failed.outputs] == [
        (i, "abort", []) for i in range(n)
    ]
    assert failed.finish_message.startswith("sampling failed for this request (RuntimeError: ")
    assert failed.finish_message.endswith("); it was aborted")
    assert finished["good"].outputs[0].token_ids == good_alone
    assert engine.kv_cache_manager.block_pool.num_free_blocks == 32 and not engine.scheduler.requests
