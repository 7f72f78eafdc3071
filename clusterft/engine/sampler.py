"""Sampler: logits of the rows that sample this step -> token ids and logprobs, vectorized over rows.

Order (as vLLM): penalties on the raw logits; the grammar bitmask of structured outputs (tokens a
row's grammar forbids at -inf, all rows at once); greedy rows take the argmax; random rows divide by
temperature, mask by top-k, top-p, min-p, then draw with the exponential race argmax(p / q),
q ~ Exp(1). A seeded request draws q from its own generator, so its tokens depend only on its seed.
Logprobs are of the raw logits (the model's distribution), as vLLM returns them. A row that fails
(params the engine's checks missed) is reported as an error; the other rows are still sampled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from clusterft.engine.sampling_params import SamplingParams
from clusterft.engine.structured import apply_token_bitmask

logger = logging.getLogger(__name__)


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int | None]  # None where the row failed
    logprobs: list[float | None]  # log-softmax of the raw logits at the sampled token
    top_logprobs: list[dict[int, float] | None]  # for rows asking for logprobs
    errors: dict[int, str] = field(default_factory=dict)  # row -> why sampling it failed


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)  # for rows without their own seed

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], bitmask: torch.Tensor | None = None
    ) -> SamplerOutput:
        """logits: (B, V) float32; bitmask: (B, ceil(V / 32)) int32 allowed tokens, or None. A row
        whose params make sampling fail gets an error, not a token;
        the others are sampled one by one then, from the random state the batch started with, so that
        greedy and seeded rows get the tokens they get in any batch."""
        generators = [self.generator, *(r.generator for r in rows if r.generator is not None)]
        states = [g.get_state() for g in generators]
        try:
            return self._sample(logits, rows, bitmask)
        except Exception:
            logger.warning(
                "sampling a batch of %d rows failed; sampling them one by one", len(rows), exc_info=True
            )
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)
        out = SamplerOutput([], [], [])
        for i, row in enumerate(rows):
            try:
                one = self._sample(logits[i : i + 1], [row], None if bitmask is None else bitmask[i : i + 1])
            except Exception as exc:
                one = SamplerOutput([None], [None], [None])
                out.errors[i] = f"{type(exc).__name__}: {exc}"
            out.token_ids += one.token_ids
            out.logprobs += one.logprobs
            out.top_logprobs += one.top_logprobs
        return out

    def _sample(
        self, logits: torch.Tensor, rows: list[SamplingRow], bitmask: torch.Tensor | None
    ) -> SamplerOutput:
        logprobs = torch.log_softmax(logits, dim=-1)
        if any(r.params.uses_penalties for r in rows):
            logits = apply_penalties(logits, rows)
        if bitmask is not None:
            logits = apply_token_bitmask(logits, bitmask)
        greedy = torch.tensor([r.params.sampling_type_greedy for r in rows])
        token_ids = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            token_ids = torch.where(greedy, token_ids, self._sample_random(logits, rows, greedy))
        sampled = logprobs.gather(1, token_ids[:, None])[:, 0].tolist()
        top: list[dict[int, float] | None] = []
        for i, row in enumerate(rows):
            k = row.params.logprobs
            if k is None:
                top.append(None)
                continue
            entry = {int(token_ids[i]): sampled[i]}
            if k:
                values, ids = logprobs[i].topk(k)
                entry.update(zip(ids.tolist(), values.tolist(), strict=True))
            top.append(entry)
        return SamplerOutput(token_ids.tolist(), sampled, top)

    def _sample_random(
        self, logits: torch.Tensor, rows: list[SamplingRow], greedy: torch.Tensor
    ) -> torch.Tensor:
        temperature = torch.tensor(
            [1.0 if g else r.params.temperature for r, g in zip(rows, greedy.tolist(), strict=True)]
        )
        logits = logits / temperature[:, None]
        top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else 0 for r in rows])
        if bool((top_k > 0).any()):
            logits = apply_top_k(logits, top_k)
        top_p = torch.tensor([r.params.top_p for r in rows])
        if bool((top_p < 1.0).any()):
            logits = apply_top_p(logits, top_p)
        min_p = torch.tensor([r.params.min_p for r in rows])
        if bool((min_p > 0).any()):
            logits = apply_min_p(logits, min_p)
        probs = torch.softmax(logits, dim=-1)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, row in enumerate(rows):
            if row.generator is not None:
                q[i].exponential_(generator=row.generator)
        return (probs / q).argmax(dim=-1)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (k == 0: keep all); ties at the k-th value are kept."""
    max_k = int(top_k.max())
    kth = logits.topk(max_k, dim=-1).values.gather(1, (top_k.clamp(min=1) - 1)[:, None])  # (B, 1)
    mask = (logits < kth) & (top_k[:, None] > 0)
    return logits.masked_fill(mask, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - top_p[:, None])
    drop[:, -1] = False
    mask = torch.zeros_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition penalty over prompt + output (HF: divide positive, multiply negative logits);
    presence and frequency penalties over output tokens (OpenAI: subtract)."""
    batch, vocab = logits.shape
    output_counts = torch.zeros(batch, vocab)
    seen = torch.zeros(batch, vocab, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row.output_token_ids:
            ids = torch.tensor(row.output_token_ids)
            output_counts[i].index_add_(0, ids, torch.ones(len(ids)))
        if row.params.repetition_penalty != 1.0:
            seen[i, torch.tensor(row.prompt_token_ids + row.output_token_ids, dtype=torch.long)] = True
    rep = torch.tensor([r.params.repetition_penalty for r in rows])[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    freq = torch.tensor([r.params.frequency_penalty for r in rows])[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in rows])[:, None]
    return logits - freq * output_counts - pres * (output_counts > 0).float()
