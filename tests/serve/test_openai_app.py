"""The real app (tensor_parallel_size 1, API key on) on 127.0.0.1, driven by the official openai
client (sync and async, streaming and not) and by raw httpx for the error cases."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, ENGINE, make_spec, offline_texts, running_app

pytestmark = pytest.mark.slow

PROMPTS = [f"the number {i} is" for i in range(64)]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = "test-admin-key-456"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module", params=["separate", "direct"])
def url(request, tiny_llama, tiny_adapter):
    """Every test runs against both shapes: a separate ingress, and the engine serving HTTP itself."""
    spec = make_spec(
        tiny_llama,
        api_key=API_KEY,
        admin_api_key=ADMIN_KEY,
        adapter_roots=[str(tiny_adapter.parent)],
        max_queued_requests=1000,
        ingress=request.param,
    )
    with running_app(spec) as base:
        yield base


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return offline_texts(tiny_llama, PROMPTS, 6)


def engine_gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_models_auth_and_health(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/health").status_code == 200  # open without a key
    assert httpx.get(f"{url}/metrics").status_code == 401  # what is served, and how much, is not
    assert httpx.get(f"{url}/metrics", headers=AUTH).status_code == 200


def test_sync_completion_and_chat_match_offline(url, reference, tiny_llama):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    r = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == reference[:3]
    assert 0 < r.usage.completion_tokens <= 18
    again = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2
    )
    assert again.choices[0].text == reference[0]
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # 5 prompt tokens: no full block
    assert len(again.choices[0].logprobs.tokens) == again.usage.completion_tokens

    # A prompt sharing k = 2 full blocks with an earlier one finds exactly those 2 * 16 tokens cached.
    prefix = list(range(300, 300 + 2 * ENGINE.block_size + 8))
    first = client.completions.create(model="tiny", prompt=prefix, max_tokens=2, temperature=0)
    second = client.completions.create(model="tiny", prompt=[*prefix[:-8], 7, 8], max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 2 * ENGINE.block_size
    assert second.usage.prompt_tokens == 2 * ENGINE.block_size + 2

    from clusterft.data import render_prompt
    from clusterft.hf.loading import load_tokenizer

    messages = [{"role": "user", "content": "hello there"}]
    chat_prompt = render_prompt(messages, "tokenizer", load_tokenizer(tiny_llama))
    [expected] = offline_texts(tiny_llama, [chat_prompt], 6)
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=6, temperature=0
    )
    assert chat.choices[0].message.content == expected
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_64_concurrent_async_streams_equal_offline(url, reference):
    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, int]:
        stream = await client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    results = asyncio.run(main())
    assert [text for text, _ in results] == reference
    assert all(0 < n <= 6 for _, n in results)


def test_chat_stream_roles_and_done(url):
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        headers=AUTH,
        timeout=60,
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        },
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200
    assert lines[-1] == "data: [DONE]"
    assert '"role":"assistant"' in lines[0].replace(" ", "")
    # One entry per choice index per chunk (OpenAI's shape): clients read `choices[0].delta`, so a
    # second entry of index 0 in a chunk would hide that chunk's text from them.
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        indices = [c["index"] for c in chunk["choices"]]
        assert len(indices) == len(set(indices)), chunk
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "tiny", "prompt": "x", "max_tokens": 1000}, 400, "256 tokens"),
        ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "temperature": 0, "best_of": 1, "n": 2}, 400, "best_of"),
        ({"model": "tiny", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ({"model": "tiny", "prompt": ""}, 400, "empty"),
        ({"model": "nope", "prompt": "x"}, 404, "nope"),
        ({"prompt": "x"}, 400, "model"),
    ],
)
def test_bad_requests_are_4xx_in_openai_schema(url, body, status, needle):
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    if status == 400 and "256" in needle:
        assert "1000" in error["message"] and "1001" in error["message"]


def test_malformed_json_is_400(url):
    r = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 400


def test_disconnect_aborts_and_frees_blocks(url):
    """The engine's gauges come from its replicas' reports (every 0.2 s): polled, not read once."""
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        deadline = time.monotonic() + 10
        while engine_gauge(url, "clusterft_kv_cache_usage_ratio") == 0:
            assert time.monotonic() < deadline, "the running request's blocks never showed"
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while engine_gauge(url, "clusterft_kv_cache_usage_ratio") > 0 or engine_gauge(
        url, "clusterft_requests_running"
    ):
        assert time.monotonic() < deadline, "blocks were not freed after the client went away"
        time.sleep(0.2)


def test_adapters_added_used_and_removed_at_runtime(url, tiny_llama, tiny_adapter):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    body = {"name": "ada", "path": str(tiny_adapter)}
    assert httpx.post(f"{url}/v1/admin/adapters", json=body, headers=AUTH).status_code == 401  # not admin
    r = httpx.post(f"{url}/v1/admin/adapters", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert httpx.post(f"{url}/v1/admin/adapters", json=body, headers=ADMIN).status_code == 409
    assert {m.id for m in client.models.list().data} == {"tiny", "ada"}
    [expected] = offline_texts(tiny_llama, PROMPTS[:1], 6, lora=("ada", tiny_adapter))
    got = client.completions.create(model="ada", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert got.choices[0].text == expected

    # Removing it while a request uses it: that request still finishes; new ones get 404.
    stream = client.completions.create(
        model="ada",
        prompt=PROMPTS[0],
        max_tokens=40,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))
    assert httpx.delete(f"{url}/v1/admin/adapters/ada", headers=ADMIN).status_code == 200
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length" and first.choices
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ada", prompt="x", max_tokens=2)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_admin_refuses_broken_adapters_reserved_names_and_paths_outside_the_roots(url, tiny_adapter):
    """Each refusal comes before any replica serves the adapter; nothing is left registered."""
    broken = tiny_adapter.parent / "broken-lora"
    shutil.copytree(tiny_adapter, broken, dirs_exist_ok=True)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    for name, path, status, needle in [
        ("broken", str(broken), 400, "r=0; the LoRA rank must be an integer >= 1"),
        ("tiny@v0002", str(tiny_adapter), 400, "'@' is reserved"),
        ("elsewhere", "/etc", 403, "outside the adapter roots"),
    ]:
        r = httpx.post(
            f"{url}/v1/admin/adapters", json={"name": name, "path": path}, headers=ADMIN, timeout=60
        )
        assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    models = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in models] == ["tiny"]


def test_beam_search_over_http_returns_the_engines_best_beams(url, tiny_llama):
    """vLLM's extension fields reach the engine's beam search: the n best of best_of beams, in order,
    equal to the offline engine's; temperature defaults to 0 there, and a sampled one is refused."""
    from clusterft.engine import LLM, SamplingParams
    from tests.serve.conftest import ENGINE

    beam = {"use_beam_search": True, "length_penalty": 0.5}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    got = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, n=2, best_of=3, extra_body=beam
    )
    params = SamplingParams(
        n=2, best_of=3, temperature=0, max_tokens=8, use_beam_search=True, length_penalty=0.5
    )
    [offline] = LLM(tiny_llama, ENGINE.to_engine_config()).generate([PROMPTS[0]], params)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [o.text for o in offline.outputs]
    assert got.choices[0].text != got.choices[1].text
    with pytest.raises(openai.BadRequestError, match="temperature=0"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0.7, extra_body=beam)
