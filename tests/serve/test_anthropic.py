"""Anthropic's Messages API beside the OpenAI one, driven by the official anthropic client: the same
greedy text as the chat route, streamed as Anthropic's events, errors in Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "tell me about the sea"}]
SYSTEM = "You answer briefly."
# The current client has no sampling arguments (the API still takes them): sent as extra body fields.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(keyed_url):
    return anthropic.Anthropic(base_url=keyed_url, auth_token=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def chat_reference(keyed_url):
    """What the OpenAI chat route answers greedily for the same conversation."""
    chat = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=API_KEY).chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": SYSTEM}, *MESSAGES],
        max_tokens=12,
        temperature=0,
    )
    return chat.choices[0].message.content, chat.usage


def test_message_equals_the_chat_route(client, chat_reference):
    text, usage = chat_reference
    msg = client.messages.create(
        model="tiny", system=SYSTEM, messages=MESSAGES, max_tokens=12, extra_body=GREEDY
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "tiny"
    assert [block.type for block in msg.content] == ["text"]
    assert msg.content[0].text == text
    assert msg.usage.input_tokens == usage.prompt_tokens
    assert msg.usage.output_tokens == usage.completion_tokens
    assert msg.stop_reason == ("max_tokens" if usage.completion_tokens == 12 else "end_turn")


def test_stream_events_and_text(client, keyed_url, chat_reference):
    text, usage = chat_reference
    with client.messages.stream(
        model="tiny", system=SYSTEM, messages=MESSAGES, max_tokens=12, extra_body=GREEDY
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text == final.content[0].text
    assert final.usage.output_tokens == usage.completion_tokens
    body = {"model": "tiny", "system": SYSTEM, "messages": MESSAGES, "max_tokens": 12, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{keyed_url}/v1/messages", json=body, headers=AUTH, timeout=60) as r:
        names = [line.split(": ", 1)[1] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_errors_in_anthropics_shape(client, keyed_url):
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", messages=MESSAGES, max_tokens=4)
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error"
    r = httpx.post(
        f"{keyed_url}/v1/messages", headers=AUTH, timeout=30, json={"model": "tiny", "messages": MESSAGES}
    )
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": r.json()["error"]["message"]},
    }
    assert "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{keyed_url}/v1/messages", headers=AUTH, timeout=30, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client.messages.create(model="tiny", messages=MESSAGES, max_tokens=4, extra_body={"temperature": 1.5})
    with pytest.raises(anthropic.BadRequestError, match="tools"):  # not served: named, never ignored
        client.messages.create(model="tiny", messages=MESSAGES, max_tokens=4, tools=[])


def test_the_clients_own_key_header_and_refusals_in_anthropics_shape(keyed_url):
    """Anthropic's key header (`x-api-key`, what its API documents and other clients send) carries the
    API key as well as a bearer token does; a missing or wrong key is refused before the body is read,
    still in Anthropic's shape."""
    own = anthropic.Anthropic(base_url=keyed_url, api_key=API_KEY, max_retries=0)
    assert own.messages.create(model="tiny", messages=MESSAGES, max_tokens=2).type == "message"
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    r = httpx.post(f"{keyed_url}/v1/messages", headers={"x-api-key": API_KEY}, timeout=30, json=body)
    assert r.status_code == 200 and r.json()["type"] == "message"
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{keyed_url}/v1/messages", headers=headers, timeout=30, json={})
        assert r.status_code == 401, headers
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
        assert "x-api-key" in r.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=keyed_url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", messages=MESSAGES, max_tokens=2
        )
    r = httpx.post(f"{keyed_url}/v1/chat/completions", headers={"x-api-key": "wrong"}, timeout=30, json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape
