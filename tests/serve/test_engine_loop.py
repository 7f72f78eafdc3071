"""EngineLoop without Serve or Ray: stream batching (`stream_interval`) over the real engine. A
batched stream must carry exactly what a per-token stream carries: the same tokens, text, logprobs
and finish reasons, stop strings cut the same way, for n > 1 too; only the message count differs."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from clusterft.engine import LLMEngine, SamplingParams
from clusterft.serve.engine_deployment import EngineLoop
from tests.serve.conftest import ENGINE, make_spec

PROMPT = [5, 17, 42, 9, 33, 8]


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLMEngine:
    return LLMEngine(tiny_llama, ENGINE.to_engine_config())


def collect(engine: LLMEngine, tiny_llama, stream_interval: int, params: SamplingParams) -> list[dict]:
    """Every chunk EngineLoop.generate yields for PROMPT."""
    loop = EngineLoop(make_spec(tiny_llama, stream_interval=stream_interval), lambda: engine)

    async def run() -> list[dict]:
        return [c async for c in loop.generate(f"r{stream_interval}", PROMPT, params, "tiny")]

    return asyncio.run(run())


def joined(chunks: list[dict]) -> dict[int, dict]:
    """Per choice index: all text, token ids and logprobs, and its finish reason (sent once, last)."""
    out: dict[int, dict] = defaultdict(lambda: {"text": "", "token_ids": [], "logprobs": [], "finish": None})
    for chunk in chunks:
        for o in chunk["outputs"]:
            choice = out[o["index"]]
            choice["text"] += o["text"]
            choice["token_ids"] += o["token_ids"]
            choice["logprobs"] += o["logprobs"] or []
            assert choice["finish"] is None, "a delta after the finish reason"
            choice["finish"] = o["finish_reason"]
    return dict(out)


def test_interval_4_sends_first_token_then_every_4_then_the_rest(engine, tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    every = collect(engine, tiny_llama, 1, params)
    batched = collect(engine, tiny_llama, 4, params)
    assert [len(c["outputs"][0]["token_ids"]) for c in every] == [1] * 10
    assert [len(c["outputs"][0]["token_ids"]) for c in batched] == [1, 4, 4, 1]
    assert joined(batched) == joined(every)
    assert [c["outputs"][0]["finish_reason"] for c in batched] == [None, None, None, "length"]
    assert [c["finished"] for c in batched] == [False, False, False, True]
    assert len(joined(batched)[0]["logprobs"]) == 10


def test_stop_string_is_cut_the_same_when_batched(engine, tiny_llama):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    text = joined(collect(engine, tiny_llama, 1, greedy))[0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: no usable stop string in {text!r}"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    every, batched = (joined(collect(engine, tiny_llama, k, params))[0] for k in (1, 5))
    assert batched == every
    assert batched["text"] == text[: text.index(stop)] and batched["finish"] == "stop"


def test_n2_seeded_sampling_batched_equals_per_token(engine, tiny_llama):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=9, ignore_eos=True, logprobs=1)
    every = collect(engine, tiny_llama, 1, params)
    batched = collect(engine, tiny_llama, 3, params)
    assert joined(batched) == joined(every) and set(joined(batched)) == {0, 1}
    assert len(batched) < len(every)
    assert all(choice["finish"] == "length" for choice in joined(batched).values())
