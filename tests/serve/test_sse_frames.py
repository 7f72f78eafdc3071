"""The chat stream's choice builder (responses.chat_chunk_choice) must send what the pydantic schema
sent before it replaced it: `ChatChunkChoice(...).model_dump(exclude_none=True)`, key for key."""

import json

import pytest

from clusterft.serve.protocol import ChatChunkChoice, ChatLogprobs, Delta, TokenLogprob, TopLogprob
from clusterft.serve.responses import ChatChunkChoices, chat_chunk_choice

LOGPROBS = ChatLogprobs(
    content=[
        TokenLogprob(
            token="hi",
            logprob=-0.25,
            bytes=[104, 105],
            top_logprobs=[TopLogprob(token="hi", logprob=-0.25, bytes=[104, 105])],
        )
    ]
)
CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": None}}


@pytest.mark.parametrize(
    "role, content, tool_calls, logprobs, finish",
    [
        ("assistant", "Hello", [], None, None),  # a first delta
        (None, " world", [], None, None),  # a later one
        (None, "", [], None, "length"),  # the last, empty
        (None, "x", [], LOGPROBS, "stop"),
        (None, "", [CALL], None, "tool_calls"),  # a None inside a call stays, as pydantic kept it
        ("assistant", "", [CALL, {**CALL, "index": 1}], LOGPROBS, None),
    ],
)
def test_chat_chunk_choice_is_the_schemas_dump(role, content, tool_calls, logprobs, finish) -> None:
    expected = ChatChunkChoice(
        index=3,
        delta=Delta(role=role, content=content, tool_calls=tool_calls or None),
        logprobs=logprobs,
        finish_reason=finish,
    ).model_dump(exclude_none=True)
    built = chat_chunk_choice(3, role, content, tool_calls, logprobs, finish)
    assert built == expected
    assert json.dumps(built) == json.dumps(expected)  # same keys in the same order


class _Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(chr(96 + i) for i in ids)


def test_chat_stream_names_the_role_once_and_finishes() -> None:
    from clusterft.serve.responses import TokenText

    choices_of = ChatChunkChoices(1, TokenText(_Tokenizer()))
    first = {"index": 0, "text": "ab", "token_ids": [1, 2], "logprobs": [{1: -0.5}, {2: -0.1}]}
    last = {"index": 0, "text": "c", "token_ids": [3], "logprobs": [{3: -1.0}], "finish_reason": "stop"}
    [one] = choices_of(0, {"outputs": [{**first, "finish_reason": None}]})
    [two] = choices_of(0, {"outputs": [last]})
    assert one["delta"] == {"role": "assistant", "content": "ab"} and "finish_reason" not in one
    assert [c["token"] for c in one["logprobs"]["content"]] == ["a", "b"]
    assert two["delta"] == {"content": "c"} and two["finish_reason"] == "stop"
    assert two["logprobs"]["content"][0]["top_logprobs"] == [{"token": "c", "logprob": -1.0, "bytes": [99]}]
