"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clusterft.engine.structured import StructuredOutputsParams


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions returned
    best_of: int | None = None  # completions generated (>= n); the n with the best cumulative logprob return
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output tokens (HF/vLLM semantics)
    presence_penalty: float = 0.0  # over output tokens
    frequency_penalty: float = 0.0  # over output tokens
    seed: int | None = None  # per-request generator: same seed, same tokens
    max_tokens: int | None = 16  # None: up to max_model_len
    stop: tuple[str, ...] = ()  # stop strings, never part of the returned text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: sampled token's logprob + top-k
    # None: none; k: each prompt token's logprob given the tokens before it + the top-k there (the
    # first token has none). Prefix-cache hits give the same numbers (see prompt_logprobs.py).
    prompt_logprobs: int | None = None
    use_beam_search: bool = False  # beam width is best_of (or n)
    length_penalty: float = 1.0  # beam search: score / generated_len ** length_penalty (HF)
    early_stopping: bool | str = False  # beam search: True | False | "never" (HF semantics)
    skip_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must match

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name, allowed, ok in _FIELD_BOUNDS:
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n}); raise best_of or lower n")
        if self.use_beam_search:
            if self.temperature != 0:
                raise ValueError("beam search is deterministic: set temperature=0 with use_beam_search=True")
            if self.stop:
                raise ValueError("stop strings are not supported with use_beam_search; use stop_token_ids")
            if self.structured_outputs is not None:
                raise ValueError("structured outputs are not supported with use_beam_search; drop one")
            if self.prompt_logprobs is not None:
                raise ValueError("prompt_logprobs are not supported with use_beam_search; drop one")

    def check_model_limits(self, vocab_size: int, num_eos_token_ids: int) -> None:
        """Raise ValueError for the bounds that depend on the model; the engine checks them when a
        request is added (as vLLM does), so that no request fails inside a step."""
        if self.top_k > vocab_size:
            raise ValueError(
                f"top_k must be -1, 0 (off) or in [1, {vocab_size}] (the model's vocab size), "
                f"got {self.top_k}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > vocab_size:
                raise ValueError(
                    f"{name} must be in [0, {vocab_size}] (the model's vocab size) or None, got {value}"
                )
        # The first beam step ranks the prompt's one row: it needs max(2, 1 + #EOS) candidates per beam.
        max_width = vocab_size // max(2, 1 + num_eos_token_ids)
        if self.use_beam_search and self.num_sequences > max_width:
            raise ValueError(
                f"beam width (best_of or n) must be <= {max_width} for this model (vocab of {vocab_size} "
                f"tokens), got {self.num_sequences}"
            )

    @property
    def sampling_type_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def num_sequences(self) -> int:
        """Sequences the engine generates: best_of (or n); for beam search, the beam width."""
        return self.best_of or self.n

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


# field, its allowed values in words, the check. Bounds that depend on the model (top_k and logprobs
# up to the vocab size, the beam width) are in SamplingParams.check_model_limits.
_FIELD_BOUNDS: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("n", "an integer >= 1", lambda v: _is_int(v) and v >= 1),
    ("best_of", "an integer >= 1 or None", _optional(lambda v: _is_int(v) and v >= 1)),
    ("temperature", "a finite number >= 0 (0 is greedy)", lambda v: _is_real(v) and v >= 0),
    ("top_k", "an integer, -1 or 0 (off) or >= 1", lambda v: _is_int(v) and v >= -1),
    ("top_p", "in (0, 1]", lambda v: _is_real(v) and 0 < v <= 1),
    ("min_p", "in [0, 1]", lambda v: _is_real(v) and 0 <= v <= 1),
    ("repetition_penalty", "a finite number > 0 (1 is off)", lambda v: _is_real(v) and v > 0),
    ("presence_penalty", "in [-2, 2]", lambda v: _is_real(v) and -2 <= v <= 2),
    ("frequency_penalty", "in [-2, 2]", lambda v: _is_real(v) and -2 <= v <= 2),
    # Sequence i's generator is seeded with seed + i: from int64 (what vLLM's OpenAI server accepts)
    # that never leaves the range torch.Generator.manual_seed takes.
    (
        "seed",
        "an integer in [-2**63, 2**63 - 1] or None",
        _optional(lambda v: _is_int(v) and -(2**63) <= v < 2**63),
    ),
    ("max_tokens", "an integer >= 1 or None", _optional(lambda v: _is_int(v) and v >= 1)),
    ("stop", "non-empty strings", lambda v: all(isinstance(s, str) and s for s in v)),
    ("stop_token_ids", "integers >= 0", lambda v: all(_is_int(i) and i >= 0 for i in v)),
    ("ignore_eos", "True or False", lambda v: isinstance(v, bool)),
    ("logprobs", "an integer >= 0 or None", _optional(lambda v: _is_int(v) and v >= 0)),
    ("prompt_logprobs", "an integer >= 0 or None", _optional(lambda v: _is_int(v) and v >= 0)),
    ("use_beam_search", "True or False", lambda v: isinstance(v, bool)),
    ("length_penalty", "a finite number", _is_real),
    ("early_stopping", "True, False or 'never'", lambda v: v in (True, False, "never")),
    ("skip_special_tokens", "True or False", lambda v: isinstance(v, bool)),
    ("detokenize", "True or False", lambda v: isinstance(v, bool)),
)
