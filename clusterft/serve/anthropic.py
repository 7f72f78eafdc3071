"""Anthropic's Messages API (`POST /v1/messages`) over the OpenAI chat route: the request becomes a
chat completion request, its answer (JSON or SSE) becomes a Message or Anthropic's stream events,
and every error leaves in Anthropic's error shape.

    MessagesRequest ──to_chat()──► chat_completions ──► JSON  ──message()──► Message
                                                    └─► SSE   ──events()───► message_start,
        content_block_start, content_block_delta..., content_block_stop, message_delta, message_stop
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clusterft.http import APIError, validation_message
from clusterft.serve.protocol import MAX_MESSAGES, MAX_STOP, ChatCompletionRequest, new_id

# OpenAI finish_reason -> Anthropic stop_reason
_STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "abort": "end_turn", None: None}
# HTTP status -> Anthropic error type
_ERROR_TYPE = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
}  # fmt: skip


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[TextBlock]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class MessagesRequest(BaseModel):
    """The Messages API fields we serve; others (tools, images, thinking) are a 400 naming them."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP)
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None

    def to_chat(self) -> ChatCompletionRequest:
        messages: list[dict[str, Any]] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            messages.append({"role": "system", "content": system})
        messages += [{"role": m.role, "content": m.text()} for m in self.messages]
        fields: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "stream": self.stream,
        }  # fmt: skip
        if self.stream:
            fields["stream_options"] = {"include_usage": True}
        if self.top_p is not None:
            fields["top_p"] = self.top_p
        if self.top_k is not None:
            fields["top_k"] = self.top_k
        if self.stop_sequences:
            fields["stop"] = self.stop_sequences
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", "messages") from exc


def parse_request(raw: bytes) -> MessagesRequest:
    """The request body; a 400 naming the field (Anthropic's shape: see error_response)."""
    try:
        return MessagesRequest.model_validate_json(raw)
    except ValidationError as exc:
        # validation_message drops a location's source (FastAPI's "body"); ours start at the field
        param, text = validation_message([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
        raise APIError(400, f"{param or 'request'}: {text}", param) from exc


def anthropic_response(chat: Response, model: str) -> Response:
    """The chat route's answer as a Message, or its stream as Anthropic's events."""
    if isinstance(chat, StreamingResponse):
        return StreamingResponse(
            events(chat.body_iterator, model),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return JSONResponse(message(json.loads(chat.body), model))


def error_response(error: APIError) -> JSONResponse:
    """An error in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    return JSONResponse(_error_body(error), status_code=error.status)


def _error_body(error: APIError) -> dict[str, Any]:
    kind = _ERROR_TYPE.get(error.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def _message_head(message_id: str, model: str, input_tokens: int) -> dict[str, Any]:
    return {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 0},
    }  # fmt: skip


def message(chat: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat.completion body -> an Anthropic Message."""
    choice = chat["choices"][0]
    out = _message_head(new_id("msg"), model, chat["usage"]["prompt_tokens"])
    out["content"] = [{"type": "text", "text": choice["message"]["content"] or ""}]
    out["stop_reason"] = _STOP_REASON.get(choice["finish_reason"], "end_turn")
    out["usage"]["output_tokens"] = chat["usage"]["completion_tokens"]
    return out


def _event(name: str, **fields: Any) -> str:
    """One server-sent event of Anthropic's stream: its name, and data whose `type` repeats it."""
    return f"event: {name}\ndata: {json.dumps({'type': name, **fields})}\n\n"


async def events(sse: AsyncIterator[str | bytes], model: str) -> AsyncIterator[str]:
    """A chat completion's SSE body -> Anthropic's stream events. The first chunk opens the message
    and its one text block; the usage chunk (asked for in to_chat) closes them with the stop reason
    and token counts; an error event of the chat stream becomes Anthropic's `error` event."""
    message_id = new_id("msg")
    opened = False
    stop_reason = None
    async for raw in sse:
        text = raw.decode() if isinstance(raw, bytes) else raw
        for line in text.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                error = chunk["error"]
                yield _event(
                    "error", error=_error_body(APIError(_status_of(error), error["message"]))["error"]
                )
                return
            if not opened:
                opened = True
                yield _event("message_start", message=_message_head(message_id, model, 0))
                yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            for choice in chunk["choices"]:
                if delta := choice["delta"].get("content"):
                    yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": delta})
                stop_reason = _STOP_REASON.get(choice.get("finish_reason"), "end_turn") or stop_reason
            if usage := chunk.get("usage"):
                yield _event("content_block_stop", index=0)
                yield _event(
                    "message_delta",
                    delta={"stop_reason": stop_reason, "stop_sequence": None},
                    usage={
                        "input_tokens": usage["prompt_tokens"],
                        "output_tokens": usage["completion_tokens"],
                    },
                )
                yield _event("message_stop")


def _status_of(error: dict[str, Any]) -> int:
    """The HTTP status of an OpenAI error body (its `code`, unless it names an internal error)."""
    return error["code"] if isinstance(error.get("code"), int) else 500
