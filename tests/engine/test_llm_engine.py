"""LLMEngine at its edge: requests the model can't serve are refused at add_request."""

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
