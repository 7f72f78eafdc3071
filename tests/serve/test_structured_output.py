"""Structured outputs over HTTP with the official openai client: response_format json_schema (strict,
and the client's own `parse` with a pydantic model), json_object, vLLM's structured_outputs extension
on completions, streamed or not; bad schemas are 400s in OpenAI's error schema naming the field.

The tiny model's weights are random: every output that parses and validates does so by the grammar.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "Describe a city as JSON."}]
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "coastal": {"type": "boolean"},
        "districts": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "population", "coastal", "districts"],
    "additionalProperties": False,
}


STRICT_CITY = {"name": "city", "schema": CITY, "strict": True}


class City(BaseModel):
    name: str = Field(max_length=10)
    population: int = Field(ge=0, le=99999)
    coastal: bool


@pytest.fixture(scope="module")
def client(keyed_url):
    return openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=API_KEY)


def test_json_schema_strict_validates(client):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=200, temperature=1.0, seed=4, n=2,
        response_format={"type": "json_schema", "json_schema": STRICT_CITY},
    )  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), CITY)


def test_openai_parse_with_a_pydantic_model(client):
    """The client's structured-output helper sends its strict schema and parses the reply itself."""
    r = client.chat.completions.parse(model="tiny", messages=ASK, max_tokens=200, response_format=City)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and 0 <= city.population <= 99999


def test_json_object_and_streamed_schema(client):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=200, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=200, stream=True, seed=9, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    )  # fmt: skip
    text = "".join(choice.delta.content or "" for chunk in stream for choice in chunk.choices)
    jsonschema.validate(json.loads(text), CITY)


def test_structured_outputs_extension_on_completions(client):
    r = client.completions.create(
        model="tiny", prompt=["the code is", "pick one:"], max_tokens=40, temperature=1.0, seed=5,
        extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-\d{3}"}},
    )  # fmt: skip
    assert all(re.fullmatch(r"[A-Z]{2}-\d{3}", c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(
        model="tiny", prompt="pick one:", max_tokens=10, n=3, temperature=1.0, seed=6,
        extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma δ"]}},
    )  # fmt: skip
    assert {c.text for c in r.choices} <= {"alpha", "beta", "gamma δ"}


FROB = {"type": "frob"}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": FROB}}},
         "response_format", "frob"),
        ({"response_format": {"type": "json_schema"}}, None, "json_schema is required"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed group"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs", "nowhere"),
        ({"structured_outputs": {"json": {"type": "object"}}, "response_format": {"type": "json_object"}},
         "response_format", "give only one"),
        ({"use_beam_search": True, "n": 2, "structured_outputs": {"regex": "a+"}}, None, "beam"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s(keyed_url, body, param, words):
    r = httpx.post(
        f"{keyed_url}/v1/chat/completions",
        headers=AUTH,
        timeout=30,
        json={"model": "tiny", "messages": ASK, **body},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param
