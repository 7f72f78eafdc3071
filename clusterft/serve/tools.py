"""Tool calling: which format a model's chat template asks for, the grammar that forces a call
(`tool_choice` required or named), and the model's text parsed back into OpenAI `tool_calls`.

Two formats, told apart by the chat template that renders the tools:

    hermes (Qwen2/2.5):  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (one or more)
    llama3_json:         {"name": "f", "parameters": {...}}                             (the whole reply)

`auto` lets the model choose and parses what it wrote (text that is not a well-formed call stays
content); `required` and a named tool constrain decoding (clusterft/engine/structured.py) to the
format with each tool's parameters schema, so the call always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from clusterft.engine.structured import StructuredOutputsParams

ToolFormat = Literal["hermes", "llama3_json"]
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# No free whitespace inside a forced call: a model cannot spend its tokens on blanks.
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}


def tool_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template renders (None: it renders no tools)."""
    if not chat_template or "tools" not in chat_template:
        return None
    if _HERMES_OPEN in chat_template:
        return "hermes"
    if "<|start_header_id|>" in chat_template or _PYTHON_TAG in chat_template:
        return "llama3_json"
    return None


def _call_schema(fmt: ToolFormat, function: dict[str, Any]) -> dict[str, Any]:
    args = "arguments" if fmt == "hermes" else "parameters"
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, args: parameters},
        "required": ["name", args],
        "additionalProperties": False,
    }


def forced_call_grammar(
    fmt: ToolFormat, functions: list[dict[str, Any]], parallel: bool
) -> StructuredOutputsParams:
    """The constraint of `tool_choice` required (any of `functions`, several calls if `parallel` and
    the format allows it) or named (`functions` is that one tool)."""
    schemas = [_call_schema(fmt, f) for f in functions]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if fmt == "llama3_json":
        return StructuredOutputsParams(json={**schema, **_COMPACT})
    call = f'"{_HERMES_OPEN}\\n" %json {json.dumps({**schema, **_COMPACT})} "\\n{_HERMES_CLOSE}"'
    start = 'call ("\\n" call)*' if parallel else "call"
    return StructuredOutputsParams(grammar=f"start: {start}\ncall: {call}")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _call_of(fmt: ToolFormat, text: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    args = obj.get("arguments" if fmt == "hermes" else "parameters") if isinstance(obj, dict) else None
    if args is None and isinstance(obj, dict) and fmt == "llama3_json":
        args = obj.get("arguments")  # Llama 3.1 prompts say "parameters"; some fine-tunes write this
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(fmt: ToolFormat, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a whole reply; a reply with no well-formed call is all content."""
    if fmt == "hermes":
        calls = [call for m in _HERMES_CALL.finditer(text) if (call := _call_of(fmt, m.group(1)))]
        if not calls:
            return text, []
        content = text[: text.index(_HERMES_OPEN)].strip()
        return content or None, calls
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    calls = [_call_of(fmt, part) for part in body.split(";")] if body.startswith("{") else [None]
    if not calls or any(c is None for c in calls):
        return text, []
    return None, calls  # type: ignore[return-value]


class ToolCallStream:
    """One streamed choice's text -> content deltas and tool-call deltas, as they become certain:
    content streams on until the text may be starting a call (held back from then on); each hermes
    call is sent once its closing tag arrives, a llama3_json reply (all one call) when it ends."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.pending = ""  # text not sent yet
        self.num_calls = 0
        self.in_calls = False  # a call has begun: the rest is calls (hermes) or the reply is one

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """New text -> (content to send now, tool-call deltas to send now)."""
        self.pending += text
        if self.fmt == "llama3_json":
            stripped = self.pending.lstrip()
            if self.in_calls or (stripped and stripped[0] in "{<" and _could_start(stripped)):
                self.in_calls = True
                return "", []
            content, self.pending = self.pending, ""
            return content, []
        content = ""
        if not self.in_calls:
            start = self.pending.find(_HERMES_OPEN)
            if start < 0:  # send all but a tail that could be the start of the opening tag
                keep = _partial_suffix(self.pending, _HERMES_OPEN)
                content, self.pending = (
                    self.pending[: len(self.pending) - keep],
                    self.pending[len(self.pending) - keep :],
                )
                return content, []
            content, self.pending = self.pending[:start].rstrip(), self.pending[start:]
            self.in_calls = True
        deltas = []
        while (end := self.pending.find(_HERMES_CLOSE)) >= 0:
            block, self.pending = (
                self.pending[: end + len(_HERMES_CLOSE)],
                self.pending[end + len(_HERMES_CLOSE) :],
            )
            _, calls = parse_tool_calls("hermes", block)
            deltas += [self._delta(call) for call in calls]
        return content, deltas

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the choice: what is still held back, as calls if it parses, else as content."""
        text, self.pending = self.pending, ""
        if not self.in_calls:
            return text, []
        content, calls = parse_tool_calls(self.fmt, text)
        if not calls:
            return content or "", []
        return "", [self._delta(call) for call in calls]

    def _delta(self, call: ToolCall) -> dict[str, Any]:
        self.num_calls += 1
        return {"index": self.num_calls - 1, **call.openai()}


def _could_start(text: str) -> bool:
    return text.startswith("{") or _PYTHON_TAG.startswith(text[: len(_PYTHON_TAG)])


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
