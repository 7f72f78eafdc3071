"""Request: one sequence the scheduler drives, from waiting to finished.

A request's tokens are `prompt_token_ids + output_token_ids`; `num_computed_tokens` counts how many of
them have KV in the cache. The scheduler has no prefill/decode branch: each step it lets
`num_computed_tokens` catch up with `num_tokens` (vLLM v1).

    |<------------------- num_tokens ------------------->|
    | prompt ............................ | output ..... |
    |<---- num_computed_tokens ---->|<- num_new_tokens ->|
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from clusterft.engine.prompt_logprobs import PromptTokenLogprob
from clusterft.engine.sampling_params import SamplingParams


def request_id_list(request_ids: str | Iterable[str]) -> list[str]:
    """One request id or many (as abort calls take them), as a list."""
    return [request_ids] if isinstance(request_ids, str) else list(request_ids)


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    SWAPPED = 2  # preempted, its KV blocks copied to the CPU pool
    PREEMPTED = 3  # preempted, its KV dropped; recomputed when rescheduled
    FINISHED_STOPPED = 4
    FINISHED_LENGTH_CAPPED = 5
    FINISHED_ABORTED = 6
    FINISHED_IGNORED = 7  # can never fit in the KV cache

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {4: "stop", 5: "length", 6: "abort", 7: "length"}.get(int(self))


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # higher runs first; FCFS within a priority
    lora_name: str | None = None
    # sha256 of the adapter's bytes (LoRAManager.digests): in its prefix-cache keys instead of the
    # name, so an adapter registered again under the name never hits the KV of the one before
    lora_digest: str | None = None
    # The completion this sequence is in its parent's output (n > 1, best_of, beam search).
    parent_id: str | None = None
    index: int = 0

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache when first scheduled
    block_hashes: list[int] = field(default_factory=list)  # of this request's full blocks, chained
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    # with sampling_params.prompt_logprobs: entry i is prompt token i's (the first None), filled as
    # the prompt is computed (or all at once from the memo); complete at num_prompt_tokens entries
    prompt_logprobs: list[PromptTokenLogprob | None] = field(default_factory=list)
    stop_reason: int | str | None = None
    finish_message: str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None  # seeded requests sample from their own stream
    grammar: Any = None  # an llguidance LLMatcher over the output tokens (structured outputs)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed + self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def has_prompt_logprobs(self) -> bool:
        """True once every prompt token's entry is in (or when none were asked for)."""
        return (
            self.sampling_params.prompt_logprobs is None
            or len(self.prompt_logprobs) == self.num_prompt_tokens
        )

    def append_output_token(self, token_id: int, logprob: float = 0.0) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def fork(self, request_id: str, index: int) -> Request:
        """A copy of this sequence so far (tokens, progress, generator state), for parallel sampling."""
        child = Request(
            request_id=request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=self.sampling_params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=self.arrival_time,
            priority=self.priority,
            lora_name=self.lora_name,
            lora_digest=self.lora_digest,
            parent_id=self.parent_id or self.request_id,
            index=index,
            status=self.status,
            output_token_ids=list(self.output_token_ids),
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            block_hashes=list(self.block_hashes),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs),
            prompt_logprobs=list(self.prompt_logprobs),
            grammar=self.grammar.deep_copy() if self.grammar is not None else None,
        )
        child.all_token_ids = list(self.all_token_ids)
        return child

    def sort_key(self) -> tuple[int, float]:
        """Scheduling order: higher priority first, then earlier arrival."""
        return (-self.priority, self.arrival_time)
