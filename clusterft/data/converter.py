"""Convert alpaca records and sharegpt conversations into `Example`s (role/content messages).

Each converter returns an Example, or a reason string saying what is wrong with the record; the
loader collects the reasons of every bad record so they are reported together.

alpaca:   {"instruction", "input", "output", "system"?, "history"?: [[query, response], ...]}
          -> [system?] + history turns + user(instruction "\\n" input) + assistant(output)
sharegpt: {"conversations": [{"from": "system"?}, {"from": "human"}, {"from": "gpt"}, ...]}
          -> optional system first, then user/tool and assistant turns alternating, assistant last
"""

from __future__ import annotations

from typing import Any

from clusterft.data.example import Example, Message
from clusterft.data.registry import DatasetAttr


def _optional_str(record: dict[str, Any], column: str | None) -> tuple[str, str | None]:
    """(value, error) of an optional string column: missing or null reads as ""."""
    if column is None or record.get(column) is None:
        return "", None
    value = record[column]
    if not isinstance(value, str):
        return "", f"{column!r} must be a string, got {type(value).__name__}"
    return value, None


def convert_alpaca(record: Any, attr: DatasetAttr, source_file: str, line: int) -> Example | str:
    if not isinstance(record, dict):
        return f"expected an object with {attr.prompt!r} and {attr.response!r}, got {type(record).__name__}"
    if attr.response not in record:
        return f"missing {attr.response!r} (the response to train on)"
    response = record[attr.response]
    if not isinstance(response, str):
        return f"{attr.response!r} must be a string, got {type(response).__name__}"
    if not response.strip():
        return f"empty {attr.response!r}: nothing to train on"
    instruction, error = _optional_str(record, attr.prompt)
    query, query_error = _optional_str(record, attr.query)
    system, system_error = _optional_str(record, attr.system)
    if error or query_error or system_error:
        return error or query_error or system_error  # type: ignore[return-value]
    # LLaMA-Factory joins the instruction and the input with a newline (either may be empty).
    prompt = "\n".join(part for part in (instruction, query) if part)
    if not prompt.strip():
        return f"empty prompt: {attr.prompt!r} and {attr.query!r} are both empty"

    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    history = record.get(attr.history) if attr.history else None
    if history is not None:
        if not isinstance(history, list) or not all(
            isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history
        ):
            return f"{attr.history!r} must be a list of [query, response] string pairs"
        for old_query, old_response in history:
            messages += [
                {"role": "user", "content": old_query},
                {"role": "assistant", "content": old_response},
            ]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return Example(messages=messages, source_file=source_file, line=line)


def convert_sharegpt(record: Any, attr: DatasetAttr, source_file: str, line: int) -> Example | str:
    if not isinstance(record, dict):
        return f"expected an object with {attr.messages!r}, got {type(record).__name__}"
    turns = record.get(attr.messages)
    if not isinstance(turns, list):
        return (
            f"missing {attr.messages!r} (a list of messages)"
            if turns is None
            else (f"{attr.messages!r} must be a list of messages, got {type(turns).__name__}")
        )
    if not turns:
        return f"empty {attr.messages!r}: nothing to train on"

    roles = {
        attr.user_tag: "user",
        attr.assistant_tag: "assistant",
        attr.system_tag: "system",
        attr.observation_tag: "tool",
    }
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or attr.role_tag not in turn or attr.content_tag not in turn:
            hint = ""
            if isinstance(turn, dict) and "role" in turn and attr.role_tag != "role":
                hint = " (OpenAI-style role/content messages: set formatting: openai in dataset_info.json)"
            return (
                f"message {index}: expected an object with {attr.role_tag!r} and {attr.content_tag!r}{hint}"
            )
        role, content = turn[attr.role_tag], turn[attr.content_tag]
        if role not in roles:
            return f"message {index}: unknown role {role!r}; expected one of {', '.join(map(repr, roles))}"
        if not isinstance(content, str):
            return f"message {index}: {attr.content_tag!r} must be a string, got {type(content).__name__}"
        messages.append({"role": roles[role], "content": content})

    system, error = _optional_str(record, attr.system)
    if error:
        return error
    if messages[0]["role"] != "system" and system:
        messages.insert(0, {"role": "system", "content": system})
    problem = check_turns(messages)
    if problem:
        return problem
    return Example(messages=messages, source_file=source_file, line=line)


def check_turns(messages: list[Message]) -> str | None:
    """Why `messages` is not a trainable conversation, or None when it is.

    After an optional system message, user (or tool) and assistant turns alternate and the
    conversation ends with an assistant turn that is not empty.
    """
    offset = 1 if messages and messages[0]["role"] == "system" else 0
    turns = messages[offset:]
    if not turns:
        return "no user/assistant turns: nothing to train on"
    for index, message in enumerate(turns, start=offset):
        expected = ("user", "tool") if (index - offset) % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            return (
                f"message {index}: roles must alternate user/assistant (after an optional system message), "
                f"got {message['role']} where {' or '.join(expected)} belongs"
            )
    if turns[-1]["role"] != "assistant":
        return "the conversation must end with an assistant turn (the response to train on)"
    if not turns[-1]["content"].strip():
        return "empty final assistant turn: nothing to train on"
    return None
