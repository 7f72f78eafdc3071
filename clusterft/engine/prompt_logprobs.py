"""Prompt logprobs: each prompt token's logprob given the tokens before it, and the top-k there.

The logits at position p score the token at p + 1, so a prefill chunk over positions [s, e) yields
the entries of prompt tokens s + 1 .. e (those still in the prompt); token 0 has none (None), as in
vLLM. Chunked prefill needs nothing more: each chunk brings the entries of its own positions.

    position   0     1     2    ...  P-2    P-1
    logits     ->t1  ->t2  ->t3      ->tP-1 ->first output token (the sampler's row)

A prefix-cache hit skips positions, and skipped positions have KV but no logits. Rather than
recompute them (a second forward over the cached prefix, whose rows differ from the first forward's
by fp32 op order as soon as the batch shape differs), the entries of a finished prompt are memoized
under the exact prompt (with the adapter and weight version that made them, as block hashes are):
a warm request hits the KV prefix cache and takes the memoized entries, the very numbers the cold
request produced. A request whose prompt is not memoized (with at least its k) skips the prefix
cache and computes every position, so its numbers are a fresh computation's either way. Each entry
is k + 2 numbers, so the memo costs far less than the KV it sits next to; it is bounded in prompt
positions and evicts the least recently used prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptTokenLogprob:
    """One prompt token's entry: its logprob and rank, and the k most likely tokens at its position."""

    logprob: float
    rank: int  # 1 + the number of tokens more likely than it
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, k: int
) -> list[PromptTokenLogprob]:
    """logits: (N, V) float32 at N positions; next_token_ids: (N,) the prompt token each scores."""
    logprobs = torch.log_softmax(logits, dim=-1)  # (N, V)
    chosen = logprobs.gather(1, next_token_ids[:, None])  # (N, 1)
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # (N,)
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(next_token_ids)
    if k:
        values, ids = logprobs.topk(k, dim=-1)  # (N, k), most likely first
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [
        PromptTokenLogprob(lp, rank, top)
        for lp, rank, top in zip(chosen[:, 0].tolist(), ranks.tolist(), tops, strict=True)
    ]


MemoKey = tuple[str | None, int, tuple[int, ...]]  # (adapter, weight version, prompt token ids)


class PromptLogprobsMemo:
    """Finished prompts' entries (first None), least recently used first out past `max_positions`."""

    def __init__(self, max_positions: int) -> None:
        self.max_positions = max_positions
        self._entries: OrderedDict[MemoKey, tuple[int, list[PromptTokenLogprob | None]]] = OrderedDict()
        self._num_positions = 0

    def get(self, key: MemoKey, k: int) -> list[PromptTokenLogprob | None] | None:
        """The entries of prompt `key` cut to the top-`k`, or None if not memoized with at least k."""
        found = self._entries.get(key)
        if found is None or found[0] < k:
            return None
        self._entries.move_to_end(key)
        stored_k, entries = found
        if stored_k == k:
            return list(entries)
        return [e if e is None else PromptTokenLogprob(e.logprob, e.rank, e.top[:k]) for e in entries]

    def put(self, key: MemoKey, k: int, entries: list[PromptTokenLogprob | None]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._num_positions -= len(old[1])
            if old[0] > k:  # keep the larger top-k: it serves both
                k, entries = old
        if len(entries) > self.max_positions:
            return
        self._entries[key] = (k, list(entries))
        self._num_positions += len(entries)
        while self._num_positions > self.max_positions:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._num_positions -= len(evicted)

    def clear(self) -> None:
        self._entries.clear()
        self._num_positions = 0
