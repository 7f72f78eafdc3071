"""tensor_parallel_size 2 on CPU (gloo): the same greedy outputs as the offline engine (tp 1), the
queue limit's 503, and a killed worker failing only the requests in flight before the app recovers."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from clusterft.engine.lora import ADAPTER_WEIGHTS
from tests.serve.conftest import ENGINE, make_spec, offline_texts, running_app

pytestmark = pytest.mark.slow

PROMPTS = [f"count {i} and" for i in range(8)]
SMALL = ENGINE.model_copy(update={"max_num_seqs": 2, "max_loras": 1})


@pytest.fixture(scope="module")
def fragile(tiny_adapter, tmp_path_factory) -> Path:
    """A copy of tiny_adapter that a test breaks after the app registered it, then mends."""
    return Path(shutil.copytree(tiny_adapter, tmp_path_factory.mktemp("fragile") / "fragile"))


@pytest.fixture(scope="module")
def url(tiny_llama, tiny_adapter, fragile):
    spec = make_spec(
        tiny_llama,
        tensor_parallel_size=2,
        engine=SMALL,
        max_queued_requests=2,
        # fragile first: ada, registered after it, takes the one host-cache place (max_cpu_loras)
        adapters={"fragile": str(fragile), "ada": str(tiny_adapter)},
        health_check_period_s=2,
    )
    with running_app(spec) as base:
        yield base


def test_tp2_equals_tp1(url, tiny_llama, tiny_adapter):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    got = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [c.text for c in got.choices] == offline_texts(tiny_llama, PROMPTS[:2], 6)
    ada = client.completions.create(model="ada", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert [ada.choices[0].text] == offline_texts(tiny_llama, PROMPTS[:1], 6, lora=("ada", tiny_adapter))


def test_an_adapter_whose_weights_vanish_fails_only_its_requests(url, tiny_llama, tiny_adapter, fragile):
    """Both ranks fail to load an adapter whose weights vanished after registration (out of the host
    cache, it is read again at its first use): its request is a 500 naming it, while a base-model
    request in the same steps is served; once the weights are back, the adapter serves its own
    outputs. Three rounds: when the failing request was the one that
    started the engine's step loop, the ingress leaving its stream once cancelled the loop's worker
    calls too (the base request got a 503), and which request starts the loop varies."""
    weights = fragile / ADAPTER_WEIGHTS
    good = weights.read_bytes()
    weights.unlink()

    async def both():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/completions",
                        json={"model": model, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0},
                    )
                    for model in ("fragile", "tiny")
                )
            )

    try:
        rounds = [asyncio.run(both()) for _ in range(3)]
    finally:
        weights.write_bytes(good)
    for broken, base in rounds:
        assert broken.status_code == 500, broken.text
        assert broken.json()["error"]["message"].startswith(
            "LoRA adapter 'fragile' could not be loaded (FileNotFound"
        )
        assert base.status_code == 200, base.text
        assert [base.json()["choices"][0]["text"]] == offline_texts(tiny_llama, PROMPTS[:1], 6)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    mended = client.completions.create(model="fragile", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert [mended.choices[0].text] == offline_texts(tiny_llama, PROMPTS[:1], 6, lora=("ada", tiny_adapter))


def test_queue_over_limit_is_503_with_retry_after(url):
    body = {"model": "tiny", "prompt": "busy", "max_tokens": 30, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] and "max_queued_requests" in rejected.json()["error"]["message"]


def test_killed_worker_fails_only_in_flight_requests_then_recovers(url, tiny_llama):
    import ray

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.completions.create(
        model="tiny",
        prompt="long",
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)
    [worker] = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("rank1")]
    ray.kill(ray.get_actor(worker["name"], namespace=worker["namespace"]))
    with pytest.raises(openai.APIError, match="worker rank 1 died"):
        for _ in chunks:
            pass
    deadline = time.monotonic() + 120
    while True:  # the replica rebuilds its workers; requests wait for that rather than fail
        try:
            got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0)
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "the app did not serve again"
            time.sleep(0.5)
    assert got.choices[0].text == offline_texts(tiny_llama, PROMPTS[:1], 6)[0]


def test_ranks_that_read_different_bytes_of_an_adapter_refuse_it():
    """Each rank reads its shard of an adapter from the files itself: ranks that read different
    bytes (files rewritten between their reads) would serve different adapters as one."""
    from clusterft.serve.worker import _agreed

    assert _agreed("x", ["d1", "d1"]) == "d1"
    with pytest.raises(ValueError, match="'x': its files changed while the tensor-parallel ranks read them"):
        _agreed("x", ["d1", "d2"])
