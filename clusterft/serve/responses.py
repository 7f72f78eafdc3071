"""Engine deltas -> OpenAI response objects and SSE streams (no HTTP server, no Ray).

The engine streams, per prompt, dicts `{"outputs": [{"index", "text", "token_ids", "logprobs",
"finish_reason"}], "prompt_tokens", "cached_tokens", "finished", "prompt_logprobs"}` (the prompt's
logprobs with the first delta, when asked for). A request with several prompts (completions)
numbers its choices `prompt_index * n + index`, as OpenAI does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from clusterft.engine.outputs import PromptLogprobs
from clusterft.http import APIError
from clusterft.serve.protocol import (
    AssistantMessage,
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobsList,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from clusterft.serve.tools import ToolCallStream, ToolFormat, parse_tool_calls


class TokenText:
    """Token id -> its text, cached (logprobs name every token and its alternatives)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


def completion_logprobs(
    token_ids: list[int], logprobs: list[dict[int, float]], k: int, text: TokenText, offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token_id, lps in zip(token_ids, logprobs, strict=True):
        token = text(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(lps.get(token_id))
        top = sorted(lps.items(), key=lambda kv: -kv[1])[: max(k, 1)]
        out.top_logprobs.append({text(t): lp for t, lp in top} if k else None)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def echo_logprobs(
    prompt_ids: list[int], prompt_logprobs: PromptLogprobs, k: int, text: TokenText
) -> CompletionLogprobs:
    """The echoed prompt's tokens in the legacy completions shape, offsets from 0; the first token has
    no prefix to score it, so its logprob and top_logprobs are null (as OpenAI's)."""
    lps = [{} if e is None else {t: lp.logprob for t, lp in e.items()} for e in prompt_logprobs]
    out = completion_logprobs(prompt_ids, lps, k, text, 0)
    out.top_logprobs[0] = None
    return out


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def vllm_prompt_logprobs(prompt_logprobs: PromptLogprobs, text: TokenText) -> PromptLogprobsList:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: entry}."""
    return [
        None
        if e is None
        else {
            t: PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=text(t)) for t, lp in e.items()
        }
        for e in prompt_logprobs
    ]


async def without_generation(
    stream: AsyncIterator[tuple[int, dict[str, Any]]],
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Completions with echo and max_tokens 0: the engine always samples a token; drop it, so that a
    choice is the prompt alone, finished by "length", with no completion tokens counted."""
    async for i, chunk in stream:
        if "error" not in chunk:
            outputs = [
                {
                    **o,
                    "text": "",
                    "token_ids": [],
                    "logprobs": None if o["logprobs"] is None else [],
                    "finish_reason": o["finish_reason"] and "length",
                }
                for o in chunk["outputs"]
            ]
            chunk = {**chunk, "outputs": outputs}
        yield i, chunk


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, float]], k: int, text: TokenText
) -> ChatLogprobs:
    content = []
    for token_id, lps in zip(token_ids, logprobs, strict=True):
        token = text(token_id)
        top = sorted(lps.items(), key=lambda kv: -kv[1])[:k]
        content.append(
            TokenLogprob(
                token=token,
                logprob=lps.get(token_id, float("-inf")),
                bytes=list(token.encode()),
                top_logprobs=[
                    TopLogprob(token=text(t), logprob=lp, bytes=list(text(t).encode())) for t, lp in top
                ],
            )
        )
    return ChatLogprobs(content=content)


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class UsageCounter:
    """Token counts of one HTTP request over all its prompts."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, prompt_index: int, chunk: dict[str, Any]) -> int:
        """Count a chunk; returns the tokens it carries."""
        self.prompt_tokens[prompt_index] = chunk["prompt_tokens"]
        self.cached_tokens[prompt_index] = chunk["cached_tokens"]
        num_tokens = sum(len(o["token_ids"]) for o in chunk["outputs"])
        self.completion_tokens += num_tokens
        return num_tokens

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens.values())
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())),
        )


class ChoiceAccumulator:
    """Collects a non-streaming request's deltas into whole choices."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.choices: dict[int, ChoiceState] = {}
        self.counter = UsageCounter()
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}  # prompt index -> its logprobs

    def add(self, prompt_index: int, chunk: dict[str, Any]) -> None:
        self.counter.add(prompt_index, chunk)
        if chunk.get("prompt_logprobs") is not None:
            self.prompt_logprobs[prompt_index] = chunk["prompt_logprobs"]
        for o in chunk["outputs"]:
            state = self.choices.setdefault(prompt_index * self.n + o["index"], ChoiceState())
            state.text.append(o["text"])
            state.token_ids += o["token_ids"]
            state.logprobs += o["logprobs"] or []
            state.finish_reason = o["finish_reason"] or state.finish_reason

    def ordered(self) -> list[tuple[int, ChoiceState]]:
        return sorted(self.choices.items())


def assistant_reply(
    text: str, finish_reason: str | None, tool_format: ToolFormat | None
) -> tuple[AssistantMessage, str | None]:
    """A chat choice's message and finish reason: with tools in use (`tool_format`), the calls the
    text makes become `tool_calls` and a reply that ended on its own finishes with "tool_calls"."""
    if tool_format is None:
        return AssistantMessage(content=text), finish_reason
    content, calls = parse_tool_calls(tool_format, text)
    if not calls:
        return AssistantMessage(content=text), finish_reason
    finish = "tool_calls" if finish_reason == "stop" else finish_reason
    return AssistantMessage(content=content, tool_calls=[c.openai() for c in calls]), finish


# ---------------------------------------------------------------- SSE streams


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` (or a literal such as `[DONE]`) and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class CompletionChunkChoices:
    """A /v1/completions stream's engine chunk -> its `choices`: echoed prompt text (and with logprobs,
    the prompt's logprobs) before a choice's first delta, text offsets of logprobs running on across
    chunks. `echo` is None without echo, else each prompt's text and token ids."""

    def __init__(
        self,
        n: int,
        echo: list[tuple[str, list[int]]] | None,
        num_logprobs: int | None,
        text: TokenText,
    ) -> None:
        self.n, self.echo, self.num_logprobs, self.text = n, echo, num_logprobs, text
        self._offsets: dict[int, int] = {}  # choice index -> characters streamed so far
        self._prompt_logprobs: dict[int, PromptLogprobs] = {}  # prompt index -> its logprobs

    def __call__(self, prompt_index: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if chunk.get("prompt_logprobs") is not None:
            self._prompt_logprobs[prompt_index] = chunk["prompt_logprobs"]
        choices = []
        for o in chunk["outputs"]:
            index = prompt_index * self.n + o["index"]
            offset = self._offsets.get(index)
            echoed, prompt_ids = self.echo[prompt_index] if self.echo and offset is None else ("", [])
            text = echoed + o["text"]
            start = len(echoed) if offset is None else offset
            lps = None
            if self.num_logprobs is not None:
                logprobs = completion_logprobs(
                    o["token_ids"], o["logprobs"] or [], self.num_logprobs, self.text, start
                )
                if prompt_ids:
                    prompt_lps = self._prompt_logprobs[prompt_index]
                    logprobs = joined(
                        echo_logprobs(prompt_ids, prompt_lps, self.num_logprobs, self.text), logprobs
                    )
                lps = logprobs.model_dump()
            self._offsets[index] = start + len(o["text"])
            choices.append(
                {"index": index, "text": text, "logprobs": lps, "finish_reason": o["finish_reason"]}
            )
        return choices


def chat_chunk_choice(
    index: int,
    role: str | None,
    content: str,
    tool_calls: list[dict[str, Any]],
    logprobs: ChatLogprobs | None,
    finish_reason: str | None,
) -> dict[str, Any]:
    """`ChatChunkChoice(...).model_dump(exclude_none=True)` built as a plain dict: a stream builds one
    per choice per chunk, and pydantic's construction and dump were most of our own per-chunk cost."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = tool_calls
    choice: dict[str, Any] = {"index": index, "delta": delta}
    if logprobs is not None:
        choice["logprobs"] = logprobs.model_dump(exclude_none=True)
    if finish_reason is not None:
        choice["finish_reason"] = finish_reason
    return choice


class ChatChunkChoices:
    """A /v1/chat/completions stream's engine chunk -> its `choices`; a choice's first delta names the
    role, as OpenAI's does."""

    def __init__(
        self, num_logprobs: int | None, text: TokenText, tool_format: ToolFormat | None = None
    ) -> None:
        self.num_logprobs, self.text, self.tool_format = num_logprobs, text, tool_format
        self._started: set[int] = set()
        self._tool_streams: dict[int, ToolCallStream] = {}  # choice index -> its tool-call parser

    def __call__(self, prompt_index: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choices = []
        for o in chunk["outputs"]:
            index = o["index"]
            # One entry per choice per chunk, as OpenAI's streams: clients read `choices[i].delta`, so
            # a separate role-only entry of the same index would hide the first chunk's text from them.
            role = None if index in self._started else "assistant"
            self._started.add(index)
            lps = None
            if self.num_logprobs is not None:
                lps = chat_logprobs(o["token_ids"], o["logprobs"] or [], self.num_logprobs, self.text)
            content, tool_calls, finish = self._tool_calls(index, o["text"], o["finish_reason"])
            choices.append(chat_chunk_choice(index, role, content, tool_calls, lps, finish))
        return choices

    def _tool_calls(
        self, index: int, text: str, finish_reason: str | None
    ) -> tuple[str, list[dict[str, Any]], str | None]:
        """(content, tool-call deltas, finish reason) of a choice's new text."""
        if self.tool_format is None:
            return text, [], finish_reason
        stream = self._tool_streams.setdefault(index, ToolCallStream(self.tool_format))
        content, calls = stream.feed(text)
        if finish_reason is not None:
            rest, more = stream.finish()
            content, calls = content + rest, calls + more
            if stream.num_calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        return content, calls, finish_reason


async def sse_events(
    stream: AsyncIterator[tuple[int, dict[str, Any]]],
    head: dict[str, Any],
    choices_of: Callable[[int, dict[str, Any]], list[dict[str, Any]]],
    counter: UsageCounter,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE body of a streamed completion or chat completion: one event per engine chunk that has
    choices (`head` + `choices`), the usage event if asked for, then `[DONE]`. An engine error ends the
    stream with an event in OpenAI's error schema (the status is sent already)."""
    async for prompt_index, chunk in stream:
        if "error" in chunk:
            yield sse(APIError.from_chunk(chunk).body())
            break
        choices = choices_of(prompt_index, chunk)
        if choices:
            yield sse({**head, "choices": choices})
    else:
        if include_usage:
            yield sse({**head, "choices": [], "usage": counter.usage().model_dump()})
    yield sse("[DONE]")
