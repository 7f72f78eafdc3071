"""EngineLoop (the engine's asyncio front end) without Serve or Ray over the real engine: streams and
their batching (`stream_interval`), and aborts. A batched stream must carry exactly what a per-token
stream carries: the same tokens, text, logprobs and finish reasons, stop strings cut the same way,
for n > 1 too; only the message count differs. A stream closed early frees its request's blocks."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pytest

from clusterft.engine import EngineConfig, LLMEngine, SamplingParams
from clusterft.engine.async_llm import EngineLoop
from clusterft.engine.core_process import EngineCoreClient
from clusterft.engine.lora import ADAPTER_WEIGHTS
from tests.engine.helpers import hf_greedy, random_prompts

PROMPT = [5, 17, 42, 9, 33, 8]


@pytest.fixture(scope="module")
def engine(llama_dir) -> LLMEngine:
    return LLMEngine(
        llama_dir, num_gpu_blocks=512, max_model_len=256, max_num_seqs=64, max_num_batched_tokens=1024
    )


def collect(engine: LLMEngine, stream_interval: int, params: SamplingParams) -> list[dict]:
    """Every chunk EngineLoop.generate yields for PROMPT."""
    loop = EngineLoop(lambda: engine, base_model="tiny", stream_interval=stream_interval)

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


def test_interval_4_sends_first_token_then_every_4_then_the_rest(engine):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    every = collect(engine, 1, params)
    batched = collect(engine, 4, params)
    assert [len(c["outputs"][0]["token_ids"]) for c in every] == [1] * 10
    assert [len(c["outputs"][0]["token_ids"]) for c in batched] == [1, 4, 4, 1]
    assert joined(batched) == joined(every)
    assert [c["outputs"][0]["finish_reason"] for c in batched] == [None, None, None, "length"]
    assert [c["finished"] for c in batched] == [False, False, False, True]
    assert len(joined(batched)[0]["logprobs"]) == 10


def test_stop_string_is_cut_the_same_when_batched(engine):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    text = joined(collect(engine, 1, greedy))[0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: no usable stop string in {text!r}"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    every, batched = (joined(collect(engine, k, params))[0] for k in (1, 5))
    assert batched == every
    assert batched["text"] == text[: text.index(stop)] and batched["finish"] == "stop"


def test_n2_seeded_sampling_batched_equals_per_token(engine):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=9, ignore_eos=True, logprobs=1)
    every = collect(engine, 1, params)
    batched = collect(engine, 3, params)
    assert joined(batched) == joined(every) and set(joined(batched)) == {0, 1}
    assert len(batched) < len(every)
    assert all(choice["finish"] == "length" for choice in joined(batched).values())


async def applied(done, timeout_s: float = 5.0) -> None:
    """Wait until `done()`: an abort is applied before the next step (at once only when none runs)."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_closing_a_stream_aborts_its_request_and_frees_its_blocks(llama_dir):
    async def main():
        loop = EngineLoop(lambda: LLMEngine(llama_dir, num_gpu_blocks=32), base_model="tiny")
        pool = loop.engine.kv_cache_manager.block_pool
        free = pool.num_free_blocks
        prompt = random_prompts([40], seed=41)[0]
        long_params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = loop.generate("long", prompt, long_params, "tiny")
        first = await stream.__anext__()
        short_params = SamplingParams(temperature=0, max_tokens=5)
        short = [c async for c in loop.generate("short", prompt[:10], short_params, "tiny")]
        assert not first["finished"] and pool.num_free_blocks < free
        await stream.aclose()
        await applied(lambda: pool.num_free_blocks == free)
        assert pool.num_free_blocks == free
        assert short[-1]["finished"] and sum(len(c["outputs"][0]["token_ids"]) for c in short) <= 5
        stats = loop.engine.get_stats()
        assert stats.num_running == 0 and stats.num_waiting == 0

    asyncio.run(main())


def test_cancelled_consumer_aborts_request(llama_dir):
    """A client disconnect cancels the task reading the stream; the request is aborted, blocks freed."""

    async def main():
        loop = EngineLoop(lambda: LLMEngine(llama_dir, num_gpu_blocks=32), base_model="tiny")
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        seen = []

        async def consume():
            async for chunk in loop.generate("x", random_prompts([20], seed=42)[0], params, "tiny"):
                seen.append(chunk)

        task = asyncio.create_task(consume())
        while not seen:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await applied(lambda: not loop.engine.scheduler.requests)
        assert not seen[-1]["finished"] and not loop.engine.scheduler.requests
        assert loop.engine.kv_cache_manager.block_pool.num_free_blocks == 32

    asyncio.run(main())


def test_requests_arriving_mid_step_neither_block_the_loop_nor_escape_their_checks(llama_dir):
    """The event loop (a replica's HTTP loop) never waits for a step: a request arriving while the
    engine steps goes to the inbox, and the step thread hands it to the engine before the next step.
    One the engine refuses (too long) still gets its 400 as its stream's only item; the admission
    bound counts requests still in the inbox."""

    async def main():
        loop = EngineLoop(
            lambda: LLMEngine(llama_dir, num_gpu_blocks=32, max_model_len=64),
            base_model="tiny",
            max_queued_requests=2,
        )
        real_step = loop.engine.step

        def slow_step():
            time.sleep(0.5)  # holds the engine lock, as a long step does
            return real_step()

        loop.engine.step = slow_step
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        first = asyncio.create_task(drain(loop.generate("a", PROMPT, params, "tiny")))
        await asyncio.sleep(0.1)  # the first step is running
        started = time.perf_counter()
        too_long = asyncio.create_task(drain(loop.generate("b", list(range(7, 107)), params, "tiny")))
        queued = [
            asyncio.create_task(drain(loop.generate(f"q{i}", PROMPT, params, "tiny"))) for i in range(3)
        ]
        await asyncio.sleep(0)  # each generate ran up to its first wait
        assert time.perf_counter() - started < 0.2, "admission waited for the running step"
        refused = await too_long
        assert len(refused) == 1 and refused[0]["error"]["status"] == 400
        assert "max_model_len" in refused[0]["error"]["message"]
        results = [await t for t in queued]
        # b and q0 wait in the inbox (b is not known to be refused yet): q1 and q2 find the queue full
        assert ["error" in r[0] for r in results] == [False, True, True]
        assert {r[0]["error"]["status"] for r in results[1:]} == {503} and results[0][-1]["finished"]
        assert (await first)[-1]["finished"]
        stats = loop.engine.get_stats()
        assert stats.num_running == 0 and stats.num_waiting == 0

    async def drain(stream) -> list[dict]:
        return [chunk async for chunk in stream]

    asyncio.run(main())


@pytest.mark.parametrize("where", ["in_process", "child"])
def test_a_request_the_engine_fails_alone_ends_in_an_error_and_the_others_stream_on(
    llama_dir, adapters, tmp_path, where
):
    """A request whose adapter no longer loads (its weights vanished after registration, and the
    adapter registered after it took its one host-cache place) ends in one 500 error naming the
    adapter, as the HTTP edge sends it; a base-model request in the same steps streams to its end,
    and the engine is not rebuilt (the step did not fail). The same with the engine in a child
    process (engine_process), whose outputs carry the abort's message."""
    broken = Path(shutil.copytree(adapters["a"][0], tmp_path / "broken"))
    built = []

    def factory() -> LLMEngine | EngineCoreClient:
        config = EngineConfig(num_gpu_blocks=64, max_loras=1, lora_modules=tuple(served.items()))
        built.append(
            LLMEngine(llama_dir, config) if where == "in_process" else EngineCoreClient(llama_dir, config)
        )
        return built[-1]

    served = {"broken": str(broken), "other": str(adapters["b"][0])}
    loop = EngineLoop(factory, base_model="tiny", adapters=served)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    (broken / ADAPTER_WEIGHTS).unlink()  # after the engine registered it

    async def run() -> tuple[list[dict], list[dict]]:
        return await asyncio.gather(
            collected(loop.generate("base", PROMPT, params, "tiny")),
            collected(loop.generate("lora", PROMPT, params, "broken")),
        )

    try:
        base, lora = asyncio.run(run())
    finally:
        loop.shutdown()
    assert len(built) == 1 and loop.num_engine_failures == 0
    assert joined(base)[0]["token_ids"] == hf_greedy(llama_dir, PROMPT, 8) and base[-1]["finished"]
    [error] = lora
    assert error["error"]["status"] == 500
    assert error["error"]["message"].startswith("LoRA adapter 'broken' could not be loaded (FileNotFound")


async def collected(stream) -> list[dict]:
    return [chunk async for chunk in stream]
