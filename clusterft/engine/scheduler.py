"""Scheduler: continuous batching over a token budget, priorities, chunked prefill, preemption.

Each step, running requests are served first (highest priority, then earliest arrival), then swapped
requests come back, then waiting ones are admitted, until the token budget or `max_num_seqs` runs
out. There is no prefill/decode branch: a request gets `num_tokens - num_computed_tokens` new tokens
(cut to the budget: chunked prefill). When blocks run out, the lowest-priority, latest running
request is preempted: swapped to the CPU pool or dropped and recomputed later.

A request with n > 1 (or best_of, or beam search) starts as one sequence `<id>#0`; it is forked into
sibling sequences that share its KV blocks (copy-on-write) once its prompt is (almost) computed.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from clusterft.engine.beam_search import BeamSearchGroup
from clusterft.engine.kv_cache_manager import KVCacheManager, cdiv
from clusterft.engine.outputs import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from clusterft.engine.prompt_logprobs import MemoKey, PromptLogprobsMemo, PromptTokenLogprob
from clusterft.engine.request import Request, RequestStatus, request_id_list


@dataclass
class SchedulerUpdate:
    """What one step changed, for the engine's output processor."""

    updated: list[Request] = field(default_factory=list)  # got a token or finished
    finished_beam_groups: dict[str, list[tuple[list[int], float]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # root id -> why it was aborted


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        preemption_mode: str = "auto",
        max_loras: int = 4,
    ) -> None:
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.preemption_mode = preemption_mode
        self.max_loras = max_loras  # distinct adapters in one step: all must be resident at once
        self.waiting: list[tuple[tuple[int, float, int], Request]] = []  # heap by (priority, arrival, seq)
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.group_members: dict[str, list[str]] = {}  # root request id -> its sequences' ids
        self.num_to_fork: dict[str, int] = {}  # first sequence of a parallel-sampling group -> group size
        self.beam_groups: dict[str, BeamSearchGroup] = {}
        self._runner_has: set[str] = set()  # requests whose state the model runner holds
        self._pending_token_ids: dict[str, list[int]] = {}  # tokens appended here, not yet sent
        self._finished_req_ids: set[str] = set()
        self._arrivals = itertools.count()
        self._sequence_ids = itertools.count(1)  # `<root>#0` is the sequence a group starts with
        self.num_preemptions = {"recompute": 0, "swap": 0}
        # Prompt logprobs of finished prompts, for prefix-cache hits (prompt_logprobs.py): a few
        # numbers per position, bounded by the positions the KV cache itself holds.
        self.prompt_logprobs_memo = PromptLogprobsMemo(
            kv_cache_manager.block_pool.num_blocks * self.kv.block_size
        )

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        sp = request.sampling_params
        root = request.parent_id or request.request_id
        self.group_members.setdefault(root, []).append(request.request_id)
        if sp.use_beam_search:
            max_new = sp.max_tokens or self.max_model_len - request.num_prompt_tokens
            self.beam_groups[root] = BeamSearchGroup(
                request.num_prompt_tokens,
                sp.num_sequences,
                min(request.num_prompt_tokens + max_new, self.max_model_len),
                request.eos_token_ids,
                sp.length_penalty,
                sp.early_stopping,
            )
        elif sp.num_sequences > 1 and request.num_prompt_tokens >= 2:
            self.num_to_fork[request.request_id] = sp.num_sequences
        if cdiv(request.num_prompt_tokens + 1, self.kv.block_size) > self.kv.block_pool.num_blocks:
            request.finish_message = (
                f"prompt of {request.num_prompt_tokens} tokens needs more than the "
                f"{self.kv.block_pool.num_blocks} KV blocks of {self.kv.block_size} tokens the cache has; "
                f"raise num_gpu_blocks / kv_cache_space or shorten the prompt"
            )
            request.status = RequestStatus.FINISHED_IGNORED
            self.group_members.pop(root)
            return
        self.requests[request.request_id] = request
        self._push_waiting(request)
        if sp.num_sequences > 1 and request.num_prompt_tokens < 2 and not sp.use_beam_search:
            # Nothing to share: the siblings start as independent requests.
            for i in range(1, sp.num_sequences):
                self._add_sibling(request, i, share_blocks=False)

    def _push_waiting(self, request: Request) -> None:
        heapq.heappush(
            self.waiting, ((-request.priority, request.arrival_time, next(self._arrivals)), request)
        )

    def _add_sibling(self, parent: Request, index: int, share_blocks: bool) -> Request:
        root = parent.parent_id or parent.request_id
        child = parent.fork(f"{root}#{next(self._sequence_ids)}", index)
        self.group_members[root].append(child.request_id)
        self.requests[child.request_id] = child
        if share_blocks:
            self.kv.fork(parent, child)
            self.running.append(child)
        else:
            self._push_waiting(child)
        return child

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """Finish (abort, or stop on a stop string) sequences or whole groups by id; frees their blocks."""
        for req_id in request_id_list(request_ids):
            for seq_id in self.group_members.get(req_id, [req_id]):
                request = self.requests.get(seq_id)
                if request is not None and not request.is_finished:
                    self._finish(request, status)
            self.beam_groups.pop(req_id, None)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        if request in self.running:
            self.running.remove(request)
        if request in self.swapped:
            self.swapped.remove(request)
        self.requests.pop(request.request_id, None)  # a waiting one is skipped when popped
        self.num_to_fork.pop(request.request_id, None)
        self._drop_beam_row(request)
        self._pending_token_ids.pop(request.request_id, None)
        if request.request_id in self._runner_has:
            self._runner_has.discard(request.request_id)
            self._finished_req_ids.add(request.request_id)
        root = request.parent_id or request.request_id
        if not any(seq_id in self.requests for seq_id in self.group_members.get(root, ())):
            self.group_members.pop(root, None)
            self.beam_groups.pop(root, None)

    def _drop_beam_row(self, request: Request) -> None:
        group = self.beam_groups.get(request.parent_id or request.request_id)
        if group is not None:
            group.drop_row(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- schedule ------------------------------------------------------------------------------
    def _num_new_tokens(self, request: Request, budget: int, num_computed: int) -> int:
        num_new = request.num_tokens - num_computed
        if request.request_id in self.num_to_fork:  # the siblings compute the last prompt token
            num_new = request.num_prompt_tokens - 1 - num_computed
        return min(num_new, budget)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_req_ids)
        self._finished_req_ids = set()
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False

        self.running.sort(key=Request.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget, request.num_computed_tokens)
            if num_new <= 0:
                i += 1
                continue
            while (changed := self.kv.allocate_slots(request, num_new)) is None:
                preempted = True
                if len(self.running) == 1:  # alone and still does not fit: it never will
                    request.finish_message = (
                        f"KV cache full: {request.num_tokens} tokens need more than the "
                        f"{self.kv.block_pool.num_blocks} blocks of {self.kv.block_size} tokens; "
                        f"raise num_gpu_blocks / kv_cache_space or lower max_tokens"
                    )
                    self._finish(request, RequestStatus.FINISHED_LENGTH_CAPPED)
                    break
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            if changed is None:
                continue
            self._record(request, num_new, changed, out, scheduled)
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._schedule_swapped(budget, out, scheduled)
        if not preempted and not self.swapped:
            self._schedule_waiting(budget, out, scheduled)

        for request, num_new in scheduled:
            request.num_computed_tokens += num_new
        self._compact(out)
        out.blocks_to_copy = self.kv.take_blocks_to_copy()
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        return out

    def _compact(self, out: SchedulerOutput) -> None:
        """Move the scheduled requests' blocks down into holes (KVCacheManager.compact) and send the
        changed tails of their block tables. Blocks written by this step's copies and swap-ins are
        left where they are: the worker applies all copies of a step at once, before swap-ins."""
        pinned = {dst for _, dst in self.kv.blocks_to_copy} | {dst for _, dst in out.blocks_to_swap_in}
        moved = self.kv.compact(out.num_scheduled_tokens, pinned)
        if not moved:
            return
        for new in out.scheduled_new_reqs:
            if new.req_id in moved:
                new.block_ids = self.kv.get_block_ids(self.requests[new.req_id])
        for diff in out.scheduled_cached_reqs:
            if diff.req_id in moved:
                start = min(diff.block_ids_start, moved[diff.req_id])
                diff.new_block_ids = self.kv.get_block_ids(self.requests[diff.req_id])[start:]
                diff.block_ids_start = start

    def _schedule_swapped(self, budget: int, out: SchedulerOutput, scheduled) -> int:
        self.swapped.sort(key=Request.sort_key)
        while self.swapped and len(self.running) < self.max_num_seqs:
            request = self.swapped[0]
            num_new = max(self._num_new_tokens(request, budget, request.num_computed_tokens), 0)
            if not self.kv.can_swap_in(request, num_new):
                break
            self.swapped.pop(0)
            out.blocks_to_swap_in.extend(self.kv.swap_in(request))
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if num_new > 0:
                changed = self.kv.allocate_slots(request, num_new)
                assert changed is not None, "can_swap_in checked the blocks"
                self._record(request, num_new, changed, out, scheduled)
                budget -= num_new
        return budget

    def _schedule_waiting(self, budget: int, out: SchedulerOutput, scheduled) -> None:
        active_loras = {r.lora_name for r in self.running if r.lora_name}
        skipped = []  # waiting for an adapter slot; they keep their place
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0][1]
            if request.is_finished or request.request_id not in self.requests:  # aborted while waiting
                heapq.heappop(self.waiting)
                continue
            if (
                request.lora_name
                and request.lora_name not in active_loras
                and len(active_loras) >= self.max_loras
            ):
                skipped.append(heapq.heappop(self.waiting))
                continue
            max_cached = request.num_prompt_tokens - 2 if request.request_id in self.num_to_fork else None
            if not self._take_memoized_prompt_logprobs(request):
                max_cached = 0  # its prompt positions must run for their logits: no prefix-cache hit
            computed_blocks, num_cached = self.kv.get_computed_blocks(request, max_cached)
            num_new = self._num_new_tokens(request, request.num_tokens, num_cached)
            if not self.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            changed = self.kv.allocate_slots(request, num_new, computed_blocks)
            if changed is None:
                if not self.running:  # nothing else holds blocks: it can never fit
                    heapq.heappop(self.waiting)
                    request.finish_message = (
                        f"{request.num_tokens} tokens need more KV blocks than the cache's "
                        f"{self.kv.block_pool.num_blocks}; raise num_gpu_blocks / kv_cache_space"
                    )
                    self._finish(request, RequestStatus.FINISHED_IGNORED)
                    continue
                break
            heapq.heappop(self.waiting)
            if request.lora_name:
                active_loras.add(request.lora_name)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._record(request, num_new, changed, out, scheduled)
            budget -= num_new
        for item in skipped:
            heapq.heappush(self.waiting, item)

    def _memo_key(self, request: Request) -> MemoKey:
        return (request.lora_digest, self.kv.weight_version, tuple(request.prompt_token_ids))

    def _take_memoized_prompt_logprobs(self, request: Request) -> bool:
        """False when `request` must compute prompt logprobs it has not got: not memoized with its k."""
        if request.has_prompt_logprobs:
            return True
        k = request.sampling_params.prompt_logprobs
        assert k is not None
        if request.num_prompt_tokens == 1:
            request.prompt_logprobs = [None]
            return True
        memoized = self.prompt_logprobs_memo.get(self._memo_key(request), k)
        if memoized is None:
            return False
        request.prompt_logprobs = memoized
        return True

    def _add_prompt_logprobs(self, request: Request, first: int, entries: list[PromptTokenLogprob]) -> None:
        """Entries for prompt tokens first.. from a step; a recomputation's repeats are dropped."""
        have = request.prompt_logprobs or [None]
        if request.has_prompt_logprobs:
            return
        assert first <= len(have), "prompt positions are computed in order"
        request.prompt_logprobs = have + entries[len(have) - first :]
        if request.has_prompt_logprobs:
            k = request.sampling_params.prompt_logprobs
            assert k is not None
            self.prompt_logprobs_memo.put(self._memo_key(request), k, request.prompt_logprobs)

    def _record(self, request: Request, num_new: int, changed, out: SchedulerOutput, scheduled) -> None:
        req_id = request.request_id
        block_ids = self.kv.get_block_ids(request)
        if req_id not in self._runner_has:
            self._runner_has.add(req_id)
            self._pending_token_ids.pop(req_id, None)
            out.scheduled_new_reqs.append(
                NewRequestData(
                    req_id,
                    list(request.all_token_ids),
                    request.num_prompt_tokens,
                    block_ids,
                    request.num_computed_tokens,
                    request.sampling_params,
                    request.lora_name,
                    request.generator,
                )
            )
        else:
            start = len(block_ids) - len(changed)
            out.scheduled_cached_reqs.append(
                CachedRequestData(
                    req_id,
                    self._pending_token_ids.pop(req_id, []),
                    block_ids[start:],
                    start,
                    request.num_computed_tokens,
                )
            )
        out.num_scheduled_tokens[req_id] = num_new
        scheduled.append((request, num_new))

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        request.num_preemptions += 1
        if request.request_id in self._runner_has:
            self._runner_has.discard(request.request_id)
            out.finished_req_ids.add(request.request_id)
        if self.preemption_mode != "recompute":
            mapping = self.kv.swap_out(request)
            if mapping is not None:
                out.blocks_to_swap_out.extend(mapping)
                request.status = RequestStatus.SWAPPED
                self.swapped.append(request)
                self.num_preemptions["swap"] += 1
                return
        self.kv.free(request)  # no room in the CPU pool (or recompute chosen): recompute later
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self._drop_beam_row(request)
        self._push_waiting(request)
        self.num_preemptions["recompute"] += 1

    # ---- update --------------------------------------------------------------------------------
    def update_from_output(
        self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput
    ) -> SchedulerUpdate:
        update = SchedulerUpdate()
        # A failed request's KV written this step may not be what its block hashes say (its adapter
        # did not load): those blocks leave the prefix cache before any request is freed.
        for req_id in runner_out.errors:
            if (request := self.requests.get(req_id)) is not None:
                written_from = request.num_computed_tokens - sched_out.num_scheduled_tokens.get(req_id, 0)
                self.kv.uncache_blocks(request, written_from)
        for req_id, error in runner_out.errors.items():
            if (request := self.requests.get(req_id)) is not None:  # else a sibling's failure aborted it
                root = request.parent_id or req_id
                update.failed[root] = f"{error}; it was aborted"
                self.finish_requests(root, RequestStatus.FINISHED_ABORTED)  # its siblings share its params
        for req_id, (first, entries) in runner_out.prompt_logprobs.items():
            request = self.requests.get(req_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                self._add_prompt_logprobs(request, first, entries)
        beam_roots = set()
        for idx, req_id in enumerate(runner_out.req_ids):
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or preempted meanwhile
            root = request.parent_id or req_id
            if root in self.beam_groups:
                self.beam_groups[root].add_row(req_id, runner_out.beam_logprobs[req_id])
                beam_roots.add(root)
                continue
            request.append_output_token(runner_out.sampled_token_ids[idx], runner_out.sampled_logprobs[idx])
            if runner_out.top_logprobs[idx] is not None:
                request.logprobs.append(runner_out.top_logprobs[idx])
            self._check_stop(request)
            update.updated.append(request)
        for req_id in sched_out.num_scheduled_tokens:
            request = self.requests.get(req_id)
            forking = request is not None and request.request_id in self.num_to_fork
            if forking and request.num_computed_tokens >= request.num_prompt_tokens - 1:
                for i in range(1, self.num_to_fork.pop(req_id)):
                    self._add_sibling(request, i, share_blocks=True)
        for root in beam_roots:
            self._maybe_step_beams(root, update)
        return update

    def _check_stop(self, request: Request) -> None:
        sp = request.sampling_params
        token_id = request.output_token_ids[-1]
        if not sp.ignore_eos and token_id in request.eos_token_ids:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
        elif token_id in sp.stop_token_ids:
            request.stop_reason = token_id
            self._finish(request, RequestStatus.FINISHED_STOPPED)
        elif (sp.max_tokens is not None and request.num_output_tokens >= sp.max_tokens) or (
            request.num_tokens >= self.max_model_len
        ):
            self._finish(request, RequestStatus.FINISHED_LENGTH_CAPPED)

    def _maybe_step_beams(self, root: str, update: SchedulerUpdate) -> None:
        group = self.beam_groups[root]
        beams = [self.requests[i] for i in self.group_members[root] if i in self.requests]
        step = group.step_when_ready([b.request_id for b in beams], [b.output_token_ids for b in beams])
        if step is None:
            return  # a beam was preempted or not scheduled yet: wait for its row
        if step.done:
            update.finished_beam_groups[root] = group.best(beams[0].sampling_params.n)
            self.finish_requests(root, RequestStatus.FINISHED_STOPPED)
            return
        continuing: list[tuple[Request, int]] = []
        used: set[int] = set()
        for parent_idx, token_id in zip(step.parents, step.token_ids, strict=True):
            parent = beams[parent_idx]
            if parent_idx in used:  # picked again: a new beam sharing the parent's blocks
                child = self._add_sibling(parent, len(continuing), share_blocks=True)
                continuing.append((child, token_id))
            else:
                used.add(parent_idx)
                continuing.append((parent, token_id))
        for idx, beam in enumerate(beams):
            if idx not in used:
                self._finish(beam, RequestStatus.FINISHED_STOPPED)
        self.group_members[root] = [beam.request_id for beam, _ in continuing]
        for beam, token_id in continuing:
            beam.append_output_token(token_id)
            if beam.request_id in self._runner_has:
                self._pending_token_ids.setdefault(beam.request_id, []).append(token_id)
