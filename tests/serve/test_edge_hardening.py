"""One request must never hurt another, at the HTTP edge of the real app (API key and admin key on, a
64 KiB body limit), while a well-formed greedy stream runs beside the bad requests and must come out
token for token as the offline engine's: every out-of-range field is a 400 naming it, prompts that
cannot be served are 400s (never a 500), limits and auth answer before anything is parsed or
tokenized, `priority` is the admin's, and nothing leaks (paths, errors). Then Schemathesis sends
requests generated from the app's own OpenAPI schema: none may get a 500, and the stream beside them
must still come out untouched."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import schemathesis

from tests.openapi_fuzz import fuzz
from tests.serve.conftest import API_KEY, make_spec, offline_texts, running_app

pytestmark = pytest.mark.slow

ADMIN_KEY = "edge-admin-key-789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_REQUEST_BYTES = 64 * 1024
STREAM_PROMPT = "a stream that must not notice the others"
STREAM_TOKENS = 40
NUM_FUZZ_EXAMPLES = 1200


@pytest.fixture(scope="module")
def url(tiny_llama) -> Iterator[str]:
    spec = make_spec(
        tiny_llama,
        api_key=API_KEY,
        admin_api_key=ADMIN_KEY,
        max_request_bytes=MAX_REQUEST_BYTES,
        max_queued_requests=1000,
    )
    with running_app(spec) as base:
        yield base


@pytest.fixture(scope="module")
def vocab_size(tiny_llama) -> int:
    from clusterft.hf.loading import model_config

    return model_config(tiny_llama)["vocab_size"]


@pytest.fixture(scope="module")
def stream_reference(tiny_llama) -> str:
    [text] = offline_texts(tiny_llama, [STREAM_PROMPT], STREAM_TOKENS)
    return text


@dataclass
class Bystander:
    """Greedy streams, one after another on a thread, until stopped: what a well-behaved client sees
    while other requests go wrong."""

    url: str
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _first: threading.Event = field(default_factory=threading.Event)

    def stream_once(self) -> None:
        body = {"model": "tiny", "prompt": STREAM_PROMPT, "max_tokens": STREAM_TOKENS, "temperature": 0}
        text = ""
        with httpx.stream(
            "POST", f"{self.url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=120
        ) as response:
            if response.status_code != 200:
                self.errors.append(f"{response.status_code}: {response.read()!r}")
                return
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    self.errors.append(json.dumps(chunk))
                    return
                text += "".join(choice["text"] for choice in chunk["choices"])
                self._first.set()
        self.texts.append(text)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.stream_once()
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))

    def __enter__(self) -> Bystander:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        assert self._first.wait(60), f"the bystander stream never started: {self.errors}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def assert_untouched(self, reference: str) -> None:
        assert not self.errors, self.errors[:5]
        assert self.texts and all(text == reference for text in self.texts), (self.texts[:3], reference)


def post(url: str, body: dict | bytes, headers: dict | None = None, path: str = "/v1/completions"):
    headers = {**AUTH, "content-type": "application/json", **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    return error


def test_out_of_range_fields_are_400_naming_the_field_beside_an_untouched_stream(
    url, vocab_size, stream_reference
):
    base = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    bad = [
        (base, {"top_k": vocab_size + 1}, "top_k"),
        (base, {"seed": 2**64 - 1, "n": 2}, "seed"),
        (base, {"seed": 2**63, "n": 2}, "seed"),
        (base, {"seed": -(2**63) - 1}, "seed"),
        (base, {"temperature": -0.5}, "temperature"),
        (base, {"top_p": 0}, "top_p"),
        (base, {"min_p": 1.5}, "min_p"),
        (base, {"repetition_penalty": 0}, "repetition_penalty"),
        (base, {"presence_penalty": 2.5}, "presence_penalty"),
        (base, {"frequency_penalty": -3}, "frequency_penalty"),
        (base, {"stop_token_ids": [-1]}, "stop_token_ids"),
        (base, {"stop": ""}, "stop"),
        (base, {"stop": ["ok", ""]}, "stop"),
        (base, {"max_tokens": 0}, "max_tokens"),
        (base, {"logprobs": -1}, "logprobs"),
        (base, {"n": 2, "best_of": 1}, "best_of"),
        (chat, {"top_k": vocab_size + 1}, "top_k"),
        (chat, {"seed": 2**64 - 1, "n": 2}, "seed"),
        (chat, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        (chat, {"max_completion_tokens": 0}, "max_completion_tokens"),
    ]
    with Bystander(url) as bystander:
        for body, fields, param in bad:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            error = assert_error(post(url, {**body, **fields}, path=path), 400, param)
            assert error["message"].startswith(param), error
        # JSON's non-numbers (Python's json reads them) are no finite number either.
        for value in ("NaN", "Infinity"):
            raw = b'{"model": "tiny", "prompt": "x", "repetition_penalty": %s}' % value.encode()
            assert_error(post(url, raw), 400, "repetition_penalty")
        # The edge of each range is served.
        ok = post(url, {**base, "top_k": vocab_size, "seed": 2**63 - 1, "n": 2, "min_p": 1.0, "top_p": 1e-9})
        assert ok.status_code == 200, ok.text
    bystander.assert_untouched(stream_reference)


def test_prompts_that_cannot_be_served_are_400_never_500(url, vocab_size):
    cases = [
        ({"prompt": []}, "give a prompt"),
        ({"prompt": [[]]}, "prompt 0 is empty"),
        ({"prompt": [[1], []]}, "prompt 1 is empty"),
        ({"prompt": [-1], "echo": True}, "must be >= 0"),
        ({"prompt": [[3], [-5]]}, "must be >= 0"),
        ({"prompt": [vocab_size], "echo": True}, f"[0, {vocab_size})"),
        ({"prompt": [5, 2**40], "echo": True}, f"[0, {vocab_size})"),
        ({"prompt": ["x"] * 129}, "at most 128 prompts"),
        ({"prompt": ""}, "empty"),
    ]
    for fields, needle in cases:
        error = assert_error(post(url, {"model": "tiny", "max_tokens": 2, **fields}), 400, "prompt")
        assert needle in error["message"], error
    echoed = post(url, {"model": "tiny", "prompt": [5, 6], "echo": True, "max_tokens": 1})
    assert echoed.status_code == 200, echoed.text


def test_limits_and_auth_answer_before_the_body_is_parsed_or_tokenized(url):
    # No key: 401, whatever the body (FastAPI used to validate it first, answering 400).
    for content in (b'{"model": "tiny", "prompt": 5}', b"{not json", b"[]"):
        assert_error(post(url, content, headers={"Authorization": ""}), 401, None)
    assert_error(
        post(url, {"model": "tiny", "prompt": "x"}, headers={"Authorization": "Bearer no"}), 401, None
    )
    # Over max_request_bytes: 413 unread, declared or sent chunked.
    big = json.dumps({"model": "tiny", "prompt": "y" * MAX_REQUEST_BYTES}).encode()
    error = assert_error(post(url, big), 413, None)
    assert error["type"] == "RequestTooLargeError" and str(MAX_REQUEST_BYTES) in error["message"]
    chunked = httpx.post(
        f"{url}/v1/completions",
        content=iter([big[: len(big) // 2], big[len(big) // 2 :]]),
        headers={**AUTH, "content-type": "application/json"},
        timeout=60,
    )
    assert_error(chunked, 413, None)
    # Counts and text the context can never hold: 400 before tokenizing.
    assert_error(post(url, {"model": "tiny", "prompt": "x", "stop": ["s"] * 17}), 400, "stop")
    assert_error(
        post(url, {"model": "tiny", "prompt": "x", "stop_token_ids": [1] * 65}), 400, "stop_token_ids"
    )
    messages = [{"role": "user", "content": "hi"}] * 1025
    chat = post(url, {"model": "tiny", "messages": messages}, path="/v1/chat/completions")
    assert_error(chat, 400, "messages")
    long_text = "z" * 20_000  # 256 tokens of context hold far fewer characters with this tokenizer
    error = assert_error(post(url, {"model": "tiny", "prompt": long_text}), 400, "prompt")
    assert "20000 characters" in error["message"], error
    long_chat = {"model": "tiny", "messages": [{"role": "user", "content": long_text}]}
    error = assert_error(post(url, long_chat, path="/v1/chat/completions"), 400, "messages")
    assert "20000 characters" in error["message"], error


def test_priority_is_the_admins(url):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    error = assert_error(post(url, {**body, "priority": 5}), 403, "priority")
    assert "admin key" in error["message"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "priority": -1}
    assert_error(post(url, chat, path="/v1/chat/completions"), 403, "priority")
    assert post(url, {**body, "priority": 5}, headers=ADMIN).status_code == 200
    assert post(url, {**body, "priority": 0}).status_code == 200
    assert_error(post(url, {**body, "priority": 10**6}, headers=ADMIN), 400, "priority")


def test_health_and_models_leak_no_paths_or_errors(url, tiny_llama):
    open_health = httpx.get(f"{url}/health", timeout=30).json()
    assert open_health == {"status": "ok", "model": "tiny", "version": None}
    full = httpx.get(f"{url}/health", headers=AUTH, timeout=30).json()
    assert full["last_error"] is None and "num_switches" in full
    models = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30)
    assert models.status_code == 200
    assert str(tiny_llama) not in models.text and all("root" not in card for card in models.json()["data"])


def test_generated_requests_get_no_500_and_the_stream_beside_them_is_untouched(url, stream_reference):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")

    def send(case: schemathesis.Case):
        return case.call(base_url=url, headers=ADMIN, timeout=60)

    with Bystander(url) as bystander:
        report = fuzz(schema, send, NUM_FUZZ_EXAMPLES)
    print("serving app fuzz:", report.summary(), f"; bystander streams: {len(bystander.texts)}")
    assert report.num_requests == NUM_FUZZ_EXAMPLES
    assert not report.server_errors, "\n".join(report.server_errors[:10])
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= set(report.per_operation)
    bystander.assert_untouched(stream_reference)
