"""A chat or completion request's output constraint and tool use, from its HTTP fields.

At most one thing may constrain a request's output: `response_format` (json_object / json_schema),
the `structured_outputs` extension, or a `tool_choice` that forces a call. The grammar is checked
here, when the body is read, so that a bad schema is a 400 naming the field it came in.
"""

from __future__ import annotations

import json
from typing import Any

from clusterft.engine.structured import StructuredOutputsParams, check_grammar
from clusterft.http import APIError
from clusterft.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    StructuredOutputs,
)
from clusterft.serve.tools import ToolFormat, forced_call_grammar, tool_format


def uses_tools(body: ChatCompletionRequest) -> bool:
    """Whether replies are parsed for tool calls: tools given and tool_choice not none."""
    return bool(body.tools) and body.tool_choice != "none"


def chat_tool_format(body: ChatCompletionRequest, chat_template: str, tokenizer: Any) -> ToolFormat | None:
    """The tool-call format of the model's chat template, when the request has tools or tool turns;
    a 400 when they cannot be rendered (a clusterft template, or a template without tools)."""
    has_tool_turns = any(m.tool_calls or m.role == "tool" for m in body.messages)
    if not body.tools and not has_tool_turns:
        return None
    field = "tools" if body.tools else "messages"
    fmt = tool_format(getattr(tokenizer, "chat_template", None))
    if chat_template != "tokenizer" or fmt is None:
        raise APIError(
            400,
            f"{field}: this model's chat template does not render tools (it must be the tokenizer's own, "
            "with a Qwen2 <tool_call> or Llama 3 JSON tool format); drop the tools or serve a model whose "
            "template has them",
            field,
        )
    return fmt


def output_constraint(
    body: CompletionRequest | ChatCompletionRequest, fmt: ToolFormat | None
) -> StructuredOutputsParams | None:
    """The request's one output constraint (None: free text), its grammar checked: a 400 naming the
    field for a schema, regex or grammar that cannot be compiled, or for two constraints at once."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    if body.structured_outputs is not None:
        found.append(("structured_outputs", _extension(body.structured_outputs)))
    if isinstance(body, ChatCompletionRequest):
        rf = body.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif rf is not None and rf.json_schema is not None:
            schema = rf.json_schema.json_schema
            found.append(
                ("response_format", StructuredOutputsParams(json=schema if schema is not None else {}))
            )
        if body.tools and fmt is not None and body.tool_choice not in (None, "none", "auto"):
            functions = [t.function.model_dump(exclude_none=True) for t in body.tools]
            if isinstance(body.tool_choice, NamedToolChoice):
                functions = [f for f in functions if f["name"] == body.tool_choice.function.name]
            found.append(("tool_choice", forced_call_grammar(fmt, functions, body.parallel_tool_calls)))
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise APIError(400, f"{names} each constrain the output: give only one", found[1][0])
    if not found:
        return None
    field, params = found[0]
    try:
        check_grammar(params)
    except ValueError as exc:
        raise APIError(400, f"{field}: {exc}", field) from exc
    return params


def _extension(so: StructuredOutputs) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(
            json=so.json_schema, json_object=bool(so.json_object), regex=so.regex,
            choice=tuple(so.choice) if so.choice is not None else None, grammar=so.grammar,
        )  # fmt: skip
    except ValueError as exc:
        raise APIError(400, str(exc), "structured_outputs") from exc


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as chat templates take them: tool calls with their arguments as objects (what
    HF templates expect; text that is not a JSON object stays text), tool turns with their call id."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                               "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls
            ]  # fmt: skip
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text
