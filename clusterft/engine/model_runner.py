"""ModelRunner: turns a SchedulerOutput into one forward pass and samples the rows that need it.

It keeps a per-request state (token ids, block table) updated from the scheduler's diffs; this is
what each tensor-parallel worker will hold, next to its CacheEngine. It never decides anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clusterft.engine.attention import AttentionMetadata, PrefillChunk, plan_decode_blocks
from clusterft.engine.cache_engine import CacheEngine
from clusterft.engine.fused_attention import use_fused
from clusterft.engine.lora import LoRAManager
from clusterft.engine.models.layers import LoRAMapping
from clusterft.engine.models.llama import LlamaForCausalLM
from clusterft.engine.outputs import ModelRunnerOutput, SchedulerOutput
from clusterft.engine.prompt_logprobs import PromptTokenLogprob, compute_prompt_logprobs
from clusterft.engine.sampler import Sampler, SamplingRow
from clusterft.engine.sampling_params import SamplingParams

PROMPT_LOGITS_ROWS = 256  # prompt positions whose logits are computed at once (prompt_logprobs)


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    lora_name: str | None
    generator: torch.Generator | None


def _rows_bitmask(so: SchedulerOutput, req_ids: list[str]) -> torch.Tensor | None:
    """The grammar bitmask of the rows sampled (in order): the scheduler's row for a structured
    request, all ones (no constraint) for the others; None when no row has a grammar."""
    if so.grammar_bitmask is None:
        return None
    row_of = {req_id: i for i, req_id in enumerate(so.structured_req_ids)}
    mask = torch.full((len(req_ids), so.grammar_bitmask.shape[1]), -1, dtype=torch.int32)
    for i, req_id in enumerate(req_ids):
        if req_id in row_of:
            mask[i] = so.grammar_bitmask[row_of[req_id]]
    return mask


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cache_engine: CacheEngine,
        block_size: int,
        sampler: Sampler,
        lora_manager: LoRAManager | None = None,
        attention_backend: str = "auto",
    ) -> None:
        self.model = model
        self.cache_engine = cache_engine
        self.block_size = block_size
        self.sampler = sampler
        self.lora_manager = lora_manager
        self.device = cache_engine.device
        self.requests: dict[str, CachedRequestState] = {}
        self._kv_buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # decode gather scratch
        self.fused = use_fused(attention_backend, self.device)

    def _decode_kv_buffers(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_blocks, kvh, bs, hd) views of scratch buffers that grow by doubling and are reused."""
        if self._kv_buffers is None or self._kv_buffers[0].shape[0] < num_blocks:
            shape = (max(num_blocks, 2 * (self._kv_buffers[0].shape[0] if self._kv_buffers else 0)),
                     *self.cache_engine.gpu_cache[0][0].shape[1:])  # fmt: skip
            like = self.cache_engine.gpu_cache[0][0]
            self._kv_buffers = (like.new_empty(shape), like.new_empty(shape))
        return self._kv_buffers[0][:num_blocks], self._kv_buffers[1][:num_blocks]

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id,
                list(new.token_ids),
                new.num_prompt_tokens,
                list(new.block_ids),
                new.num_computed_tokens,
                new.sampling_params,
                new.lora_name,
                new.generator,
            )
        for diff in so.scheduled_cached_reqs:
            state = self.requests[diff.req_id]
            state.token_ids.extend(diff.new_token_ids)
            state.block_ids[diff.block_ids_start :] = diff.new_block_ids
            state.num_computed_tokens = diff.num_computed_tokens

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        # Swap-outs first: their device blocks may be reused by this step's copies and writes.
        self.cache_engine.swap_out(so.blocks_to_swap_out)
        self.cache_engine.copy(so.blocks_to_copy)
        self.cache_engine.swap_in(so.blocks_to_swap_in)
        if not so.num_scheduled_tokens:
            return ModelRunnerOutput([], [], [], [])

        # Decodes (one new token) first, then prefill chunks.
        states = [self.requests[req_id] for req_id in so.num_scheduled_tokens]
        decodes = [s for s in states if so.num_scheduled_tokens[s.req_id] == 1]
        prefills = [s for s in states if so.num_scheduled_tokens[s.req_id] > 1]
        ordered = decodes + prefills
        input_ids, positions, meta = self._prepare_inputs(ordered, so.num_scheduled_tokens, len(decodes))
        lora, unloadable = self._lora_mapping(ordered, so.num_scheduled_tokens)
        hidden = self.model(input_ids, positions, self.cache_engine.gpu_cache, meta, lora)
        prompt_logprobs = self._prompt_logprobs(hidden, ordered, so.num_scheduled_tokens)

        # Rows to sample: requests whose computed tokens reach the end of their tokens.
        sample_states, logits_indices, end = [], [], 0
        for state in ordered:
            n = so.num_scheduled_tokens[state.req_id]
            end += n
            if state.num_computed_tokens + n == len(state.token_ids):
                sample_states.append(state)
                logits_indices.append(end - 1)
        out = ModelRunnerOutput([], [], [], [])
        if sample_states:
            logits = self.model.compute_logits(hidden[torch.tensor(logits_indices, device=self.device)])
            out = self._sample(logits.cpu(), sample_states, so)
        out.prompt_logprobs = prompt_logprobs
        for state in ordered:  # their rows ran without the adapter: tokens and KV are not theirs
            if state.lora_name in unloadable:
                out.errors[state.req_id] = unloadable[state.lora_name]
        return out

    def _prompt_logprobs(
        self, hidden: torch.Tensor, ordered: list[CachedRequestState], num_scheduled: dict[str, int]
    ) -> dict[str, tuple[int, list[PromptTokenLogprob]]]:
        """Entries of the prompt tokens this step's positions score, for requests asking for them:
        position p (in the prompt, p + 1 too) scores prompt token p + 1. A request recomputed after
        preemption scores its prompt again; the scheduler keeps the first entries."""
        found: dict[str, tuple[int, list[PromptTokenLogprob]]] = {}
        row = 0
        for state in ordered:
            n, start = num_scheduled[state.req_id], state.num_computed_tokens
            k = state.sampling_params.prompt_logprobs
            end = min(start + n, state.num_prompt_tokens - 1)  # last position scoring a prompt token
            if k is not None and end > start:
                entries: list[PromptTokenLogprob] = []
                # A few rows of (rows, V) logits at a time: a long prompt chunk never holds its whole
                # logits matrix (2,048 positions of a 152k vocab would be 1.2 GB).
                for lo in range(start, end, PROMPT_LOGITS_ROWS):
                    hi = min(lo + PROMPT_LOGITS_ROWS, end)
                    logits = self.model.compute_logits(hidden[row + lo - start : row + hi - start]).cpu()
                    next_ids = torch.tensor(state.token_ids[lo + 1 : hi + 1], dtype=torch.long)
                    entries += compute_prompt_logprobs(logits, next_ids, k)
                found[state.req_id] = (start + 1, entries)
            row += n
        return found

    def _sample(
        self, logits: torch.Tensor, states: list[CachedRequestState], so: SchedulerOutput
    ) -> ModelRunnerOutput:
        n = len(states)
        out = ModelRunnerOutput([s.req_id for s in states], [None] * n, [0.0] * n, [None] * n)
        sampling = []  # (index in states, state) of the rows the sampler draws; beam rows go whole
        for i, state in enumerate(states):
            if state.sampling_params.use_beam_search:
                out.beam_logprobs[state.req_id] = torch.log_softmax(logits[i], dim=-1)
            else:
                sampling.append((i, state))
        if not sampling:
            return out
        rows = [
            SamplingRow(
                s.sampling_params,
                s.generator,
                s.token_ids[: s.num_prompt_tokens],
                s.token_ids[s.num_prompt_tokens :],
            )
            for _, s in sampling
        ]
        indices = [i for i, _ in sampling]
        bitmask = _rows_bitmask(so, [s.req_id for _, s in sampling])
        sampled = self.sampler(logits[indices] if len(indices) < n else logits, rows, bitmask)
        for row, (i, state) in enumerate(sampling):
            if row in sampled.errors:
                out.errors[state.req_id] = f"sampling failed for this request ({sampled.errors[row]})"
                continue
            state.token_ids.append(sampled.token_ids[row])
            out.sampled_token_ids[i] = sampled.token_ids[row]
            out.sampled_logprobs[i] = sampled.logprobs[row]
            out.top_logprobs[i] = sampled.top_logprobs[row]
        return out

    def _prepare_inputs(
        self, ordered: list[CachedRequestState], num_scheduled: dict[str, int], num_decodes: int
    ):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        for state in ordered:
            start = state.num_computed_tokens
            input_ids.extend(state.token_ids[start : start + num_scheduled[state.req_id]])
            positions.extend(range(start, start + num_scheduled[state.req_id]))
        pos = torch.tensor(positions, dtype=torch.long)
        # slot of each new token: block_table[pos // bs] * bs + pos % bs
        block_of_token = []
        for state in ordered:
            start = state.num_computed_tokens
            n = num_scheduled[state.req_id]
            first, last = start // bs, (start + n - 1) // bs
            for b in range(first, last + 1):
                lo, hi = max(start, b * bs), min(start + n, (b + 1) * bs)
                block_of_token.extend([state.block_ids[b]] * (hi - lo))
        slot_mapping = torch.tensor(block_of_token, dtype=torch.long) * bs + pos % bs

        dev = self.device
        decode_blocks, tables, context_lens = [], None, None
        if num_decodes and self.fused:
            tables, context_lens = self._decode_tables(ordered[:num_decodes], positions[:num_decodes])
        elif num_decodes:
            decode_blocks = self._decode_blocks(ordered[:num_decodes], pos[:num_decodes] + 1)
        prefills, start_idx = [], num_decodes
        for state in ordered[num_decodes:]:
            n = num_scheduled[state.req_id]
            context = None
            if state.num_computed_tokens:
                num_blocks = -(-(state.num_computed_tokens + n) // bs)
                context = torch.tensor(state.block_ids[:num_blocks], dtype=torch.long, device=dev)
            prefills.append(PrefillChunk(start_idx, n, state.num_computed_tokens, context))
            start_idx += n
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(dev),
            num_decodes=num_decodes,
            decode_blocks=decode_blocks,
            prefills=prefills,
            sliding_window=self.model.args.sliding_window,
            decode_block_tables=tables,
            decode_context_lens=context_lens,
            fused_kernels=self.fused,
        )
        return torch.tensor(input_ids, dtype=torch.long, device=dev), pos.to(dev), meta

    def _decode_tables(
        self, decode_states: list[CachedRequestState], positions: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused kernel's inputs: each decode's blocks up to its token, padded with block 0 (never
        read: the kernel stops at the context length), and its context length."""
        bs = self.block_size
        counts = [p // bs + 1 for p in positions]
        width = max(counts)
        rows = [s.block_ids[:n] + [0] * (width - n) for s, n in zip(decode_states, counts, strict=True)]
        tables = torch.tensor(rows, dtype=torch.int32)
        return tables, torch.tensor(positions, dtype=torch.int32) + 1

    def _decode_blocks(self, decode_states: list[CachedRequestState], context_lens: torch.Tensor):
        return plan_decode_blocks(
            [state.block_ids for state in decode_states],
            context_lens,
            self.block_size,
            self.model.args.sliding_window,
            self.device,
            self._decode_kv_buffers,
        )

    def _lora_mapping(
        self, ordered: list[CachedRequestState], num_scheduled: dict[str, int]
    ) -> tuple[LoRAMapping | None, dict[str, str]]:
        """Which rows each resident adapter applies to, and {name: why} for the adapters that could
        not be loaded (their files changed or vanished since add_lora, or the name was removed).
        Those rows still run, on the base model, so that the batch is the same on every
        tensor-parallel rank whichever of them failed; the runner fails their requests."""
        unloadable: dict[str, str] = {}
        if self.lora_manager is None or not any(s.lora_name for s in ordered):
            return None, unloadable
        ranges: dict[int, list[torch.Tensor]] = {}
        start = 0
        for state in ordered:
            n, name = num_scheduled[state.req_id], state.lora_name
            if name and name not in unloadable:
                try:
                    slot = self.lora_manager.activate(name)
                except Exception as exc:
                    unloadable[name] = (
                        f"LoRA adapter {name!r} could not be loaded ({type(exc).__name__}: {exc}); "
                        "restore its files, or register it again"
                    )
                else:
                    ranges.setdefault(slot, []).append(torch.arange(start, start + n))
            start += n
        groups = []
        for slot, parts in ranges.items():
            index = torch.cat(parts)
            groups.append((slot, None if len(index) == start else index.to(self.device)))
        return (LoRAMapping(groups) if groups else None), unloadable
