"""Structured output: grammars a request's tokens must follow, by constrained decoding (llguidance).

A request asking for structured output carries one grammar matcher (llguidance's `LLMatcher`, which
compiles JSON schemas, regexes, choices and Lark grammars against the model's tokenizer). Each step:

    schedule() ──► grammar_bitmask(): one row of allowed-token bits per request that samples
               ──► workers: the sampler masks the whole batch's logits with it (apply_token_bitmask)
    update    ──► advance_grammars(): each matcher consumes the token its request got

The matcher lives with the request in the scheduler process and depends only on the tokens the
request has accepted, so preemption (swap or recompute) and prefix-cache hits leave it right: a
recomputed request re-runs its tokens through the model, never through its matcher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match: exactly one of a JSON schema (`json`, a dict or its JSON text), any
    JSON object (`json_object`), a regex, a list of choices, or a Lark grammar (vLLM's names)."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):  # kept as text: frozen params stay hashable and picklable
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(_KINDS)}; got "
                f"{', '.join(given) or 'none'}"
            )
        if self.choice is not None and not (
            self.choice and all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    def grammar_text(self) -> str:
        """The llguidance grammar of this constraint (not yet checked: see GrammarCompiler)."""
        from llguidance import LLMatcher

        # Compact JSON (no free whitespace between tokens): what OpenAI returns, and a model cannot
        # spend its max_tokens on blanks.
        options = {"whitespace_flexible": False}
        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json, defaults=options)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            import llguidance

            return llguidance.grammar_from("choice", json.dumps(list(self.choice)))
        assert self.grammar is not None
        return LLMatcher.grammar_from_lark(self.grammar)


def check_grammar(params: StructuredOutputsParams, tokenizer: Any = None) -> str:
    """The grammar text of `params`; ValueError naming the problem when llguidance refuses it (a
    schema it cannot compile, a bad regex or Lark grammar). `tokenizer`: an LLTokenizer, or None."""
    from llguidance import LLMatcher

    try:  # llguidance raises ValueError (or TypeError, for JSON of the wrong shape) on what it refuses
        grammar = params.grammar_text()
        error = LLMatcher.validate_grammar(grammar, tokenizer)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"structured_outputs.{params.kind}: {exc}") from exc
    if error:
        raise ValueError(f"structured_outputs.{params.kind}: {error.strip()}")
    return grammar


class GrammarCompiler:
    """Matchers for one model: llguidance's view of the tokenizer (every token's bytes, so byte-level
    BPE tokens that split a UTF-8 character are matched byte by byte), the model's vocab size (the
    bitmask covers embedding rows past the tokenizer's too: never allowed) and its EOS ids (allowed
    once the grammar is complete, and then only they)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        import llguidance
        import llguidance.hf

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids) or None
        )
        self.executor = llguidance.LLExecutor(num_threads=2)

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh LLMatcher for `params`; ValueError (naming the problem) for a grammar llguidance
        refuses."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, check_grammar(params, self.tokenizer), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{params.kind}: {matcher.get_error()}")
        return matcher

    def bitmask(self, matchers: list[Any]) -> torch.Tensor:
        """(len(matchers), ceil(V / 32)) int32 allowed-token bits, computed in parallel (llguidance's
        executor, without the GIL)."""
        # llguidance.numpy, not llguidance.torch: importing the latter wraps a kernel in torch.compile,
        # which loads dynamo (measured: 13-26 s on a busy 2-core machine) for a mask we apply ourselves.
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

        mask = allocate_token_bitmask(len(matchers), self.vocab_size)
        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], mask)
        return torch.from_numpy(mask)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with every token whose bit is 0 in `bitmask` (B, ceil(V / 32)) int32 at -inf; a
    row of all ones (-1) leaves its logits as they are. Bit j of word w is token 32 * w + j."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[1]]  # (B, V)
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
