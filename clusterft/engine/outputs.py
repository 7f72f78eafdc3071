"""What crosses the scheduler/worker boundary each step, and what the engine returns to callers.

SchedulerOutput is the only thing workers receive: new (or resumed) requests in full, running ones
as diffs, plus the block copies and swaps to do before the forward pass. It holds plain data
(ids, lists), so it pickles cheaply to tensor-parallel worker actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clusterft.engine.prompt_logprobs import PromptTokenLogprob
from clusterft.engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    token_ids: list[int]  # prompt + output so far (a resumed request recomputes its output too)
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int  # before this step
    sampling_params: SamplingParams
    lora_name: str | None
    generator: torch.Generator | None


@dataclass
class CachedRequestData:
    req_id: str
    new_token_ids: list[int]  # tokens appended by the scheduler (forks, beam search) since last step
    new_block_ids: list[int]  # replace the block table from index `block_ids_start`
    block_ids_start: int
    num_computed_tokens: int  # before this step


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: set[str] = field(default_factory=set)  # finished or preempted: drop their state
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu), done first
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, gpu)
    # Structured outputs: row i of grammar_bitmask holds the tokens structured_req_ids[i] may sample.
    structured_req_ids: list[str] = field(default_factory=list)
    grammar_bitmask: torch.Tensor | None = None  # (len(structured_req_ids), ceil(V / 32)) int32


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]  # requests that reached the end of their tokens this step (logits computed)
    sampled_token_ids: list[int | None]  # None for beam search rows (the scheduler picks beams), errors
    sampled_logprobs: list[float]  # log-softmax of the raw logits at the sampled token
    top_logprobs: list[dict[int, float] | None]  # for requests asking for logprobs
    beam_logprobs: dict[str, torch.Tensor] = field(default_factory=dict)  # req_id -> (V,) log-softmax
    errors: dict[str, str] = field(default_factory=dict)  # req_id -> why it failed (sampling, its adapter)
    # req_id -> (index of the first prompt token scored, entries): this step's prompt positions
    prompt_logprobs: dict[str, tuple[int, list[PromptTokenLogprob]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Logprob:
    """A token's logprob and its rank among the vocab (1: the most likely), as vLLM returns them."""

    logprob: float
    rank: int


# Per prompt token: None for the first, else {prompt token: Logprob, then the top-k: Logprob}.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    finish_message: str | None = None  # why a request ended early (e.g. it can never fit)
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_usage: float  # device blocks in use / all device blocks
    prefix_cache_hit_rate: float  # prefix_cache_hits / prefix_cache_queries
    prefix_cache_queries: int  # tokens of admitted requests looked up in the prefix cache
    prefix_cache_hits: int  # of which found there
    num_preemptions_recompute: int
    num_preemptions_swap: int
    kv_utilization_at_peak: float  # tokens held / slots of the blocks held, when the most blocks were used
    num_steps: int
