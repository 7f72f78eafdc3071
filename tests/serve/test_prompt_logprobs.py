"""Prompt logprobs over HTTP with the official openai client: `echo` + `logprobs` on /v1/completions
(OpenAI's legacy shape, streaming and not, and `max_tokens: 0` for pure scoring), vLLM's
`prompt_logprobs` extension on completions and chat, cold and warm prefix cache alike, and 400s in
OpenAI's error schema for bad values."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.slow

PROMPT = [17, 301, 45, 99, 512, 8, 77, 250, 13, 640, 21, 333, 90, 47, 5, 600, 71, 18, 404, 36]


@pytest.fixture(scope="module")
def client(keyed_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def hf_rows(hf, prompt: list[int]) -> torch.Tensor:
    """(P - 1, V): HF's log-softmax at positions 0 .. P-2, each scoring the next prompt token."""
    with torch.inference_mode():
        return torch.log_softmax(hf[0](torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(client, hf):
    tokenizer = hf[1]
    rows = hf_rows(hf, PROMPT)
    common = dict(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    plain = client.completions.create(**common).choices[0]
    echoed = client.completions.create(**common, echo=True).choices[0]
    echo_text = tokenizer.decode(PROMPT)
    assert echoed.text == echo_text + plain.text
    lps = echoed.logprobs
    n = len(PROMPT)
    assert len(lps.tokens) == n + 3
    assert lps.tokens[:n] == [tokenizer.decode([t]) for t in PROMPT]
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    for pos in range(1, n):
        assert abs(lps.token_logprobs[pos] - float(rows[pos - 1, PROMPT[pos]])) < 1e-5
        values, ids = rows[pos - 1].topk(2)
        assert lps.top_logprobs[pos] == pytest.approx(
            {tokenizer.decode([i]): v for i, v in zip(ids.tolist(), values.tolist(), strict=True)}, abs=1e-5
        )
    # The completion's part is the plain request's, its offsets after the echoed text.
    assert lps.tokens[n:] == plain.logprobs.tokens
    assert lps.token_logprobs[n:] == plain.logprobs.token_logprobs
    assert lps.text_offset[0] == 0 and lps.text_offset[n] == len(echo_text)
    assert lps.text_offset == sorted(lps.text_offset)


def test_echo_with_logprobs_streams_the_same(client):
    common = dict(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**common).choices[0]
    text, tokens, token_logprobs, offsets = "", [], [], []
    for chunk in client.completions.create(**common, stream=True):
        for choice in chunk.choices:
            text += choice.text
            tokens += choice.logprobs.tokens
            token_logprobs += choice.logprobs.token_logprobs
            offsets += choice.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens
    assert token_logprobs == whole.logprobs.token_logprobs
    assert offsets == whole.logprobs.text_offset


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_with_echo_scores_only(client, hf, stream):
    """lm-eval-harness's loglikelihood request: the prompt's logprobs, nothing generated."""
    rows = hf_rows(hf, PROMPT)
    common = dict(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0, temperature=0)
    if stream:
        chunks = list(
            client.completions.create(**common, stream=True, stream_options={"include_usage": True})
        )
        choices = [c for chunk in chunks for c in chunk.choices]
        text = "".join(c.text for c in choices)
        token_logprobs = [lp for c in choices for lp in c.logprobs.token_logprobs]
        finish, usage = choices[-1].finish_reason, chunks[-1].usage
    else:
        resp = client.completions.create(**common)
        [choice] = resp.choices
        text, token_logprobs = choice.text, choice.logprobs.token_logprobs
        finish, usage = choice.finish_reason, resp.usage
        assert choice.logprobs.top_logprobs == [None] * len(PROMPT)  # logprobs 0: no alternatives
    assert text == hf[1].decode(PROMPT)
    assert finish == "length"
    assert usage.completion_tokens == 0 and usage.prompt_tokens == len(PROMPT)
    assert len(token_logprobs) == len(PROMPT) and token_logprobs[0] is None
    got = torch.tensor(token_logprobs[1:])
    want = rows.gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    assert torch.allclose(got, want, atol=1e-5)


def _check_vllm_shape(prompt_logprobs, prompt, rows, tokenizer, k):
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = prompt_logprobs[pos]
        token = prompt[pos]
        mine = entry[str(token)]
        assert abs(mine["logprob"] - float(rows[pos - 1, token])) < 1e-5
        assert mine["rank"] == int((rows[pos - 1] > rows[pos - 1, token]).sum()) + 1
        assert mine["decoded_token"] == tokenizer.decode([token])
        top = {int(t) for t, e in entry.items() if e["rank"] <= k}
        assert top == set(rows[pos - 1].topk(k).indices.tolist())


def test_prompt_logprobs_extension_on_completions_and_chat(client, hf):
    tokenizer = hf[1]
    rows = hf_rows(hf, PROMPT)
    resp = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 3}
    )
    _check_vllm_shape(resp.model_dump()["choices"][0]["prompt_logprobs"], PROMPT, rows, tokenizer, 3)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert plain.model_dump()["choices"][0]["prompt_logprobs"] is None

    messages = [{"role": "user", "content": "score me please"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 1}
    )
    # The chat prompt as the server renders it (the tokenizer's template): scored like any prompt.
    from clusterft.data import render_prompt

    chat_prompt = tokenizer.encode(render_prompt(messages, "tokenizer", tokenizer), add_special_tokens=False)
    assert chat.usage.prompt_tokens == len(chat_prompt)
    _check_vllm_shape(
        chat.model_dump()["prompt_logprobs"], chat_prompt, hf_rows(hf, chat_prompt), tokenizer, 1
    )


def test_cold_and_warm_requests_give_the_same_numbers(client):
    prompt = [(7 * i + 3) % 900 + 5 for i in range(70)]  # new to this server: the first run is cold
    body = dict(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=3)
    cold = client.completions.create(**body, extra_body={"prompt_logprobs": 3})
    warm = client.completions.create(**body, extra_body={"prompt_logprobs": 3})
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    assert warm.choices[0].logprobs.token_logprobs == cold.choices[0].logprobs.token_logprobs
    assert (
        warm.model_dump()["choices"][0]["prompt_logprobs"]
        == cold.model_dump()["choices"][0]["prompt_logprobs"]
    )


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"echo": True, "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt_logprobs": 21}, "prompt_logprobs", "less than or equal to 20"),
        ({"prompt_logprobs": -1}, "prompt_logprobs", "an integer >= 0 or None"),
        ({"prompt_logprobs": "two"}, "prompt_logprobs", "integer"),
        ({"prompt_logprobs": 1, "stream": True}, None, "not available with stream=true"),
        ({"max_tokens": 0}, "max_tokens", "(0 only with echo=true)"),
        ({"max_tokens": -1, "echo": True}, "max_tokens", "an integer >= 1 or None"),
        ({"echo": True, "logprobs": 1, "use_beam_search": True, "temperature": 0}, None, "beam search"),
        ({"prompt_logprobs": 1, "use_beam_search": True, "temperature": 0}, "prompt_logprobs", "beam"),
    ],
)
def test_bad_values_are_openai_400s(client, keyed_url, body, param, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=PROMPT, extra_body=body)
    assert needle in info.value.message
    r = httpx.post(
        f"{keyed_url}/v1/completions",
        json={"model": "tiny", "prompt": PROMPT, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 25}
    r = httpx.post(
        f"{keyed_url}/v1/chat/completions",
        json=chat,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
