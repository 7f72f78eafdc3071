"""EngineCoreClient: the engine in a child process (ServeSpec.engine_process), no Ray. It must answer
exactly what the in-process engine answers (greedy and seeded tokens, text, logprobs, stats, errors
as their own types), and fail like one: a child killed under a step fails the requests in flight and
EngineLoop rebuilds it; a replica that dies takes its child with it; a model that does not load is an
error at construction, with no child left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from clusterft.engine import EngineConfig, LLMEngine, SamplingParams
from clusterft.engine.async_llm import EngineLoop
from clusterft.engine.core_process import EngineCoreClient
from clusterft.engine.model_runner import ModelRunner
from clusterft.engine.outputs import RequestOutput
from tests.engine.helpers import FAILING_REQUEST, failing_forward, random_prompts

ROOT = Path(__file__).resolve().parents[2]  # the repo: the child's sitecustomize imports tests.engine

CONFIG = EngineConfig(num_gpu_blocks=256, max_model_len=128, max_num_seqs=16)


def gone(pid: int, timeout_s: float) -> bool:
    """Whether process `pid` ends (or is a zombie) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def client(llama_dir):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child takes this process's count: the tests' in-process engines' one
    try:
        engine = EngineCoreClient(llama_dir, CONFIG, weight_version=3)
    finally:
        torch.set_num_threads(threads)
    yield engine
    engine.shutdown()
    assert gone(engine.pid, 10)


def run_all(engine, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    """Every output, in order, until all `prompts` have finished (the outputs are dataclasses: equal
    when every field is, cumulative token ids, text, logprobs and prompt logprobs included). The
    child steps on its own and one step() hands out every step's outputs that have come, so the
    steps' outputs are compared joined."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}", prompt, params)
    outputs, finished = [], 0
    while finished < len(prompts):
        step = engine.step()
        outputs += step
        finished += sum(out.finished for out in step)
    return outputs


def test_the_child_answers_exactly_what_the_engine_in_process_answers(client, llama_dir):
    local = LLMEngine(llama_dir, CONFIG)
    local.weight_version = 3
    prompts = random_prompts([5, 9, 17, 30, 6, 12], seed=1)
    for params in (
        SamplingParams(temperature=0, max_tokens=12, logprobs=2, prompt_logprobs=1),
        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=9, ignore_eos=True),
        SamplingParams(n=1, best_of=3, temperature=1.0, seed=6, max_tokens=7, logprobs=0),
        SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=6),
        SamplingParams(temperature=0, max_tokens=16, stop=["e"]),
    ):
        served, expected = run_all(client, prompts, params), run_all(local, prompts, params)
        assert served == expected and len(served) >= len(prompts), params
    assert client.max_model_len == local.max_model_len == 128
    assert client.num_gpu_blocks == local.num_gpu_blocks == 256
    assert client.weight_version == 3
    stats = client.get_stats()
    assert stats.num_steps > 0 and stats.num_running == stats.num_waiting == 0
    assert client.num_waiting() == 0 and client.list_loras() == [] and client.resident_adapters() == []


def test_the_child_steps_on_its_own_and_one_step_call_catches_up(client):
    """No request per step: while it has work the child steps and reports; a replica that was busy
    elsewhere gets every step's outputs, in order, from its next step() call."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    steps_before = client.get_stats().num_steps
    client.add_request("alone", [5, 6, 7], params)
    first = client.step()
    deadline = time.monotonic() + 60
    while (stats := client.get_stats()).num_running:  # calls are answered between steps
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    rest = client.step()
    outputs = first + rest
    assert [len(o.outputs[0].token_ids) for o in outputs] == list(range(1, 21))
    assert outputs[-1].finished and len(rest) > 1
    assert stats.num_steps - steps_before == 20
    assert client.step() == []  # nothing running, nothing owed: no wait


def test_refusals_come_with_the_next_step_and_the_child_serves_on(client, llama_dir):
    """add_request does not wait for the child; a request it refuses is handed out by
    take_rejected() after the next step, as the error LLMEngine.add_request raises (EngineLoop
    answers it with a 400). A call's error is raised as its own type."""
    with pytest.raises(ValueError, match="max_model_len") as in_process:
        LLMEngine(llama_dir, CONFIG).add_request("long", list(range(1, 300)))
    client.add_request("long", list(range(1, 300)), SamplingParams(max_tokens=4))
    client.add_request("twice", [5, 6], SamplingParams(max_tokens=40, ignore_eos=True))
    client.add_request("twice", [5, 6], SamplingParams(max_tokens=4))
    client.step()
    rejected = dict(client.take_rejected())
    assert set(rejected) == {"long", "twice"} and client.take_rejected() == []
    assert type(rejected["long"]) is ValueError and str(rejected["long"]) == str(in_process.value)
    assert "already in use" in str(rejected["twice"])
    client.abort_request("twice")
    with pytest.raises(FileNotFoundError):
        client.add_lora("nope", "/nonexistent/adapter")
    client.add_request("after", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3))
    client.abort_request("after")
    assert client.step() == []
    assert run_all(client, [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))[-1].finished

    loop = EngineLoop(lambda: client, base_model="tiny")

    async def refused() -> list[dict]:
        return [c async for c in loop.generate("big", list(range(1, 300)), SamplingParams(), "tiny")]

    [chunk] = asyncio.run(refused())
    assert chunk["error"]["status"] == 400 and "max_model_len" in chunk["error"]["message"]


def test_a_step_that_raises_is_raised_by_step_and_the_child_takes_nothing_more(
    llama_dir, tmp_path, monkeypatch
):
    """A step whose forward pass raises (what a device out of memory looks like; injected into the
    child at its start through sitecustomize) is reported as failed: the client's step() raises the
    error the in-process engine raises, and the child steps no more and takes no more requests
    (EngineLoop rebuilds the engine), yet still answers calls."""
    params = SamplingParams(max_tokens=4)
    with monkeypatch.context() as patch:
        patch.setattr(ModelRunner, "execute_model", failing_forward(ModelRunner.execute_model))
        in_process = LLMEngine(llama_dir, CONFIG)
        in_process.add_request(FAILING_REQUEST, [5, 6, 7], params)
        with pytest.raises(RuntimeError) as expected:
            in_process.step()

    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from clusterft.engine.model_runner import ModelRunner
            from tests.engine.helpers import failing_forward
            ModelRunner.execute_model = failing_forward(ModelRunner.execute_model)
        """)
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    client = EngineCoreClient(llama_dir, CONFIG)
    try:
        client.add_request(FAILING_REQUEST, [5, 6, 7], params)
        with pytest.raises(RuntimeError) as raised:
            client.step()
        assert str(raised.value) == str(expected.value) == "the forward pass failed (injected)"
        client.add_request("later", [5, 6, 7], params)
        assert client.step() == []  # the child saw it (no wait), and dropped it
        stats = client.get_stats()
        assert (stats.num_running, stats.num_waiting, stats.num_steps) == (1, 0, 0)
    finally:
        client.shutdown()
    assert gone(client.pid, 10)


def test_requests_added_and_aborted_while_the_child_steps(client, llama_dir):
    """The child steps on while an abort is on its way: the reports it made before the abort must
    not leak outputs of the aborted request, and a request added meanwhile is served as in process."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    client.add_request("keep", [5, 6, 7, 8], params)
    client.add_request("drop", [9, 10, 11], params)
    assert {o.request_id for o in client.step()} == {"keep", "drop"}
    time.sleep(0.2)  # the child runs ahead: its reports of "drop" are on their way
    client.abort_request("drop")
    client.add_request("late", [12, 13, 14], params)
    seen, finished = [], {}
    while len(finished) < 2:
        for out in client.step():
            seen.append(out.request_id)
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert "drop" not in seen and set(finished) == {"keep", "late"}
    local = LLMEngine(llama_dir, CONFIG)
    expected = run_all(local, [[12, 13, 14]], params)[-1].outputs[0].token_ids
    assert finished["late"] == expected
    assert client._outputs._requests == {} and client._outputs._aborted == {}


def test_waiting_count_comes_with_each_report(llama_dir):
    engine = EngineCoreClient(llama_dir, EngineConfig(num_gpu_blocks=256, max_model_len=128, max_num_seqs=2))
    try:
        for i in range(5):
            engine.add_request(f"w{i}", [3, 4, 5, i + 6], SamplingParams(max_tokens=100, ignore_eos=True))
        engine.step()
        assert engine.num_waiting() == 3 == engine.get_stats().num_waiting
    finally:
        engine.shutdown()
    assert gone(engine.pid, 10), "a child stepping when told to shut down must still stop"


def test_a_child_killed_mid_stream_fails_its_requests_and_the_loop_rebuilds_it(llama_dir):
    built: list[EngineCoreClient] = []

    def factory() -> EngineCoreClient:
        built.append(EngineCoreClient(llama_dir, CONFIG))
        return built[-1]

    loop = EngineLoop(factory, base_model="tiny")
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def run() -> tuple[list[dict], list[dict]]:
        chunks = []
        async for chunk in loop.generate("doomed", [5, 6, 7], params, "tiny"):
            chunks.append(chunk)
            if len(chunks) == 2:
                os.kill(built[0].pid, signal.SIGKILL)
        after = [c async for c in loop.generate("after", [5, 6, 7], SamplingParams(max_tokens=4), "tiny")]
        return chunks, after

    try:
        chunks, after = asyncio.run(run())
        assert chunks[-1]["error"]["status"] == 503
        assert "engine core process" in chunks[-1]["error"]["message"]
        assert "exited with code -9" in chunks[-1]["error"]["message"]
        assert len(built) == 2 and loop.num_engine_failures == 1
        assert after[-1]["finished"] and len(after[-1]["outputs"][0]["token_ids"]) > 0
    finally:
        loop.shutdown()
    assert all(gone(engine.pid, 10) for engine in built)


def test_the_child_exits_when_its_replica_process_is_killed(llama_dir):
    """The replica is SIGKILLed (as Serve or the OOM killer does): no handler runs in it, yet the
    child must not outlive it holding the model's memory."""
    script = textwrap.dedent(
        f"""
        from clusterft.engine import EngineConfig
        from clusterft.engine.core_process import EngineCoreClient
        engine = EngineCoreClient({str(llama_dir)!r}, EngineConfig(num_gpu_blocks=64, max_model_len=64))
        print(engine.pid, flush=True)
        import time; time.sleep(600)
        """
    )
    replica = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(replica.stdout.readline())
        assert psutil.Process(child).ppid() == replica.pid
        replica.kill()
        replica.wait()
        assert gone(child, 10), "the engine core outlived its replica"
    finally:
        replica.kill()


def test_a_model_that_does_not_load_is_an_error_and_leaves_no_child(tmp_path):
    """The error is the one the engine raises in process, type and message."""
    with pytest.raises(Exception) as in_process:
        LLMEngine(tmp_path, CONFIG)
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(type(in_process.value)) as in_child:
        EngineCoreClient(tmp_path, CONFIG)
    assert str(in_child.value) == str(in_process.value)
    left = [p for p in psutil.Process().children() if p.pid not in before and p.is_running()]
    assert all(gone(p.pid, 10) for p in left)


def test_a_step_sends_only_what_the_replica_lacks():
    """Outputs are cumulative; the wire is not: after a request's first output its prompt (ids and
    logprobs) is not sent again, and each sequence sends only its new tokens and logprobs."""
    from clusterft.engine.core_process import _OutputDecoder, _OutputEncoder
    from clusterft.engine.outputs import CompletionOutput

    prompt = list(range(500))

    def output(num_tokens: int, finished: bool = False) -> RequestOutput:
        tokens = list(range(100, 100 + num_tokens))
        logprobs = [{t: -1.0} for t in tokens]
        sequence = CompletionOutput(0, "ab" * num_tokens, tokens, -float(num_tokens), logprobs)
        return RequestOutput("r", None, prompt, [sequence], finished, 16, None, [None, {}])

    encoder, decoder = _OutputEncoder(), _OutputDecoder()
    first, second = encoder.encode(output(3)), encoder.encode(output(5, finished=True))
    assert first[2] == prompt and second[1:4] == (None, None, None)
    [(_, text, token_start, new_ids, logprob_start, new_logprobs, *_)] = second[-1]
    assert (token_start, new_ids, logprob_start, len(new_logprobs)) == (3, [103, 104], 3, 2)
    assert text == "ab" * 5
    assert [decoder.decode(first), decoder.decode(second)] == [output(3), output(5, finished=True)]
    assert encoder._sent == {} and decoder._requests == {}  # finished: nothing kept on either side
