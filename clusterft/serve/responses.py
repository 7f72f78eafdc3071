"""Engine deltas -> OpenAI response objects (pure functions: no HTTP, no Ray).

The engine streams, per prompt, dicts `{"outputs": [{"index", "text", "token_ids", "logprobs",
"finish_reason"}], "prompt_tokens", "cached_tokens", "finished"}`. A request with several prompts
(completions) numbers its choices `prompt_index * n + index`, as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clusterft.serve.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)


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

    def add(self, prompt_index: int, chunk: dict[str, Any]) -> None:
        self.counter.add(prompt_index, chunk)
        for o in chunk["outputs"]:
            state = self.choices.setdefault(prompt_index * self.n + o["index"], ChoiceState())
            state.text.append(o["text"])
            state.token_ids += o["token_ids"]
            state.logprobs += o["logprobs"] or []
            state.finish_reason = o["finish_reason"] or state.finish_reason

    def ordered(self) -> list[tuple[int, ChoiceState]]:
        return sorted(self.choices.items())
