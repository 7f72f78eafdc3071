"""engine_process: true on the real app (127.0.0.1, direct ingress, the shape the benchmark found
fastest): the replica's engine runs in a child process and serves exactly the offline engine's greedy
completions, base and adapter, streamed or not, with the engine's stats on /metrics. A child killed
under a stream fails that stream with the reason and the same replica serves again (a new child, no
Serve restart); stopping the app leaves no child behind."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import openai
import psutil
import pytest

from tests.serve.conftest import make_spec, offline_texts, running_app
from tests.serve.test_engine_replica_kill import engine_replica_pid

PROMPTS = [f"count {i} and" for i in range(6)]


def engine_cores(replica_pid: int) -> list[psutil.Process]:
    """The replica's engine core children (python -m clusterft.engine.core_process)."""
    return [
        p
        for p in psutil.Process(replica_pid).children()
        if "clusterft.engine.core_process" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
    ]


def test_the_engine_in_a_child_process_serves_fails_and_stops_like_one_in_process(tiny_llama, tiny_adapter):
    spec = make_spec(tiny_llama, ingress="direct", engine_process=True, adapters={"ada": str(tiny_adapter)})
    with running_app(spec) as url:
        replica = engine_replica_pid()
        [core] = engine_cores(replica)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        got = [
            client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in PROMPTS
        ]
        assert got == offline_texts(tiny_llama, PROMPTS, 8)
        streamed = client.completions.create(
            model="ada", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True
        )
        text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
        assert text == offline_texts(tiny_llama, PROMPTS[:1], 8, lora=("ada", tiny_adapter))[0]
        deadline = time.monotonic() + 30  # replicas report their engine's stats at each admin sync
        while "clusterft_kv_cache_blocks 512.0" not in (metrics := httpx.get(f"{url}/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.5)
        assert re.search(r"^clusterft_engine_steps_total [1-9]", metrics, re.M), metrics

        stream = client.completions.create(
            model="tiny", prompt="long", max_tokens=200, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        next(chunks)
        os.kill(core.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match=r"engine core process .* exited with code -9"):
            for _ in chunks:
                pass
        after = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        assert after.choices[0].text == got[1]
        assert engine_replica_pid() == replica, "Serve replaced the replica: only its engine should go"
        [new_core] = engine_cores(replica)
        assert new_core.pid != core.pid
    deadline = time.monotonic() + 30
    while new_core.is_running() and new_core.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the engine core outlived the app"
        time.sleep(0.1)


def test_a_sharded_engine_cannot_run_in_a_child(tiny_llama):
    """A sharded engine's workers are Ray actors, which a child outside Ray could not call."""
    with pytest.raises(ValueError, match=r"engine_process .* tensor_parallel_size: 1"):
        make_spec(tiny_llama, engine_process=True, tensor_parallel_size=2)
    assert make_spec(tiny_llama).engine_process is False
