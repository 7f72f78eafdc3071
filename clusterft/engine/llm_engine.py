"""LLMEngine (add requests, step) and LLM, the offline batch API on top of it.

One step is three calls, as in nano-vllm: `scheduler.schedule()` -> `executor.execute_model()`
-> `scheduler.update_from_output()`, then outputs are detokenized and stop strings applied. The
executor (executor.py) holds the model and the KV tensors, in this process or on worker actors.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from clusterft.engine.config import EngineConfig
from clusterft.engine.executor import Executor, LocalExecutor
from clusterft.engine.kv_cache_manager import KVCacheManager
from clusterft.engine.models import LlamaForCausalLM, ModelConfig
from clusterft.engine.output_processor import OutputProcessor, RequestState
from clusterft.engine.outputs import EngineStats, RequestOutput, SchedulerOutput
from clusterft.engine.request import Request, RequestStatus, request_id_list
from clusterft.engine.sampling_params import SamplingParams
from clusterft.engine.scheduler import Scheduler, SchedulerUpdate
from clusterft.engine.structured import GrammarCompiler


def _eos_token_ids(model_dir: Path, hf_config, tokenizer) -> frozenset[int]:
    """EOS ids as HF generate uses them: generation_config.json's list, else config / tokenizer."""
    gen = model_dir / "generation_config.json"
    for eos in (
        json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None,
        getattr(hf_config, "eos_token_id", None) or tokenizer.eos_token_id,
    ):
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if ids:
            return frozenset(ids)
    return frozenset()


class LLMEngine:
    """Scheduling, the KV block table and detokenization; `executor_factory(model_dir, config,
    model_args)` builds what runs the forward passes (LocalExecutor: this process)."""

    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        *,
        executor_factory: Callable[[Path, EngineConfig, ModelConfig], Executor] = LocalExecutor,
        **config_overrides,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.config = config = config or EngineConfig(**config_overrides)
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.model_args = ModelConfig.from_hf_config(hf_config)
        self.max_model_len = config.max_model_len or self.model_args.max_position_embeddings
        self.eos_token_ids = _eos_token_ids(self.model_dir, hf_config, self.tokenizer)
        self.executor = executor_factory(self.model_dir, config, self.model_args)
        self.num_gpu_blocks = self.executor.num_gpu_blocks
        self.num_cpu_blocks = self.executor.num_cpu_blocks
        self.kv_cache_manager = KVCacheManager(
            config.block_size, self.num_gpu_blocks, self.num_cpu_blocks, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            preemption_mode=config.preemption_mode,
            max_loras=config.max_loras,
        )
        self.lora_manager = self.executor.lora_manager
        self.output_processor = OutputProcessor(self.tokenizer)
        self._grammars: GrammarCompiler | None = None  # built by the first structured request
        self._pending_outputs: list[str] = []  # roots finished at admission (never fit)
        self._request_counter = itertools.count()
        self.num_steps = 0
        self._peak_blocks = 0
        self._kv_utilization_at_peak = 0.0

    # ---- executor --------------------------------------------------------------------------------
    @property
    def model(self) -> LlamaForCausalLM:
        """The in-process model (LocalExecutor only), for tests and benchmarks that call it directly."""
        return self.executor.model

    def check_health(self) -> None:
        """Raise when a worker of the executor is gone."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Release the executor's workers; the engine can't step afterwards."""
        self.executor.shutdown()

    # ---- weights ---------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        """Part of every prefix-cache block hash: bump it when the weights change (promotion)."""
        return self.kv_cache_manager.weight_version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        self.kv_cache_manager.weight_version = version

    def add_lora(self, name: str, path: str | Path) -> None:
        self.lora_manager.add_lora(name, path)

    def list_loras(self) -> list[str]:
        """The registered adapters' names, in registration order (vLLM's `list_loras`)."""
        return list(self.lora_manager.paths)

    def resident_adapters(self) -> list[str]:
        """The adapters whose weights are loaded now, least recently used first (an executor that
        keeps them in its workers reports none)."""
        return list(getattr(self.lora_manager, "resident", ()))

    def remove_lora(self, name: str) -> None:
        """Forget adapter `name`. Its prefix-cache blocks stay until evicted: they are keyed by the
        adapter's bytes, so the same adapter registered again hits them, and another one never does."""
        self.lora_manager.remove_lora(name)

    # ---- requests --------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str | None,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        lora_name: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError for prompts and params the model can
        never serve, so that no request fails inside a step."""
        params = params or SamplingParams()
        params.check_model_limits(self.model_args.vocab_size, len(self.eos_token_ids))
        request_id = request_id if request_id is not None else str(next(self._request_counter))
        if request_id in self.output_processor.states:
            raise ValueError(f"request_id {request_id!r} is already in use; pass a unique request_id")
        text = prompt if isinstance(prompt, str) else None
        token_ids = (
            self.tokenizer.encode(prompt, add_special_tokens=False) if text is not None else list(prompt)
        )
        if not token_ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}: shorten the "
                f"prompt or raise max_model_len (the model allows {self.model_args.max_position_embeddings})"
            )
        if max(token_ids) >= self.model_args.vocab_size or min(token_ids) < 0:
            raise ValueError(
                f"prompt token ids must be in [0, {self.model_args.vocab_size}), the model's vocab"
            )
        if lora_name is not None and lora_name not in self.list_loras():
            raise ValueError(f"unknown lora_name {lora_name!r}: register it with add_lora(name, path) first")
        grammar = None
        if params.structured_outputs is not None:
            if self._grammars is None:
                self._grammars = GrammarCompiler(
                    self.tokenizer, self.model_args.vocab_size, self.eos_token_ids
                )
            grammar = self._grammars.matcher(params.structured_outputs)
        multi = params.num_sequences > 1 or params.use_beam_search
        request = Request(
            request_id=f"{request_id}#0" if multi else request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            priority=priority,
            lora_name=lora_name,
            lora_digest=self.lora_manager.digests[lora_name] if lora_name else None,
            parent_id=request_id if multi else None,
            grammar=grammar,
        )
        self.output_processor.add_request(RequestState(request_id, text, token_ids, params))
        self.scheduler.add_request(request)
        if request.is_finished:  # can never fit: reported by the next step
            self.output_processor.finish_ignored(request)
            self._pending_outputs.append(request_id)
        return request_id

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests now; their blocks return to the pool at once."""
        ids = request_id_list(request_ids)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for root in ids:
            self.output_processor.abort(root)
            self.output_processor.states.pop(root, None)

    def has_unfinished_requests(self) -> bool:
        """True while some request has not returned its final output."""
        pending = bool(self.output_processor.states)
        assert not pending or self.scheduler.has_unfinished_requests() or self._pending_outputs, (
            "lost requests"
        )
        return pending

    # ---- step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; the outputs of the requests it changed. A request whose sampling fails is
        aborted (finish_reason "abort", the error in finish_message); the others run on."""
        sched_out = self.scheduler.schedule()
        self._track_utilization()
        self._add_grammar_bitmask(sched_out)
        runner_out = self.executor.execute_model(sched_out)
        update = self.scheduler.update_from_output(sched_out, runner_out)
        self._advance_grammars(update)
        self.num_steps += 1
        return self._make_outputs(update)

    def _add_grammar_bitmask(self, sched_out: SchedulerOutput) -> None:
        """The allowed tokens of the structured requests that sample this step (their computed tokens
        reach their last token), one bitmask row each, for the sampler."""
        if self._grammars is None:
            return
        sampling = [
            request
            for req_id in sched_out.num_scheduled_tokens
            if (request := self.scheduler.requests.get(req_id)) is not None
            and request.grammar is not None
            and request.num_computed_tokens == request.num_tokens
        ]
        if sampling:
            sched_out.structured_req_ids = [r.request_id for r in sampling]
            sched_out.grammar_bitmask = self._grammars.bitmask([r.grammar for r in sampling])

    def _advance_grammars(self, update: SchedulerUpdate) -> None:
        """Each structured request's matcher consumes the token it got. The bitmask allowed only
        tokens the grammar accepts, so a refusal is a broken invariant: the request is aborted with
        llguidance's reason rather than streaming output that does not match."""
        for request in update.updated:
            grammar = request.grammar
            if grammar is None or grammar.is_stopped():
                continue
            if not grammar.consume_token(request.output_token_ids[-1]):
                root = request.parent_id or request.request_id
                update.failed[root] = (
                    f"structured output: the grammar refused a token ({grammar.get_error()})"
                )
                self.scheduler.finish_requests(root, RequestStatus.FINISHED_ABORTED)

    def _make_outputs(self, update: SchedulerUpdate) -> list[RequestOutput]:
        touched, stopped = self.output_processor.process(update.updated)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        for root, best in update.finished_beam_groups.items():
            self.output_processor.finish_beams(root, best, self.eos_token_ids)
        for root, message in update.failed.items():
            self.output_processor.fail(root, message)
        touched.update(update.finished_beam_groups, update.failed, self._pending_outputs)
        self._pending_outputs = []
        outputs = []
        for root in sorted(touched):
            if root in self.output_processor.states and (out := self.output_processor.make_output(root)):
                outputs.append(out)
        return outputs

    def _track_utilization(self) -> None:
        used = self.kv_cache_manager.block_pool.num_used_blocks
        if used > self._peak_blocks:
            tokens = sum(r.num_computed_tokens for r in self.scheduler.running)
            self._peak_blocks = used
            self._kv_utilization_at_peak = tokens / (used * self.config.block_size)

    def num_waiting(self) -> int:
        """Requests admitted but not yet scheduled (get_stats' count, without its other figures)."""
        s = self.scheduler
        return sum(1 for _, r in s.waiting if not r.is_finished and r.request_id in s.requests)

    def get_stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv_cache_manager
        return EngineStats(
            num_running=len(s.running),
            num_waiting=self.num_waiting(),
            num_swapped=len(s.swapped),
            kv_usage=kv.usage(),
            prefix_cache_hit_rate=kv.prefix_cache_hit_rate(),
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions_recompute=s.num_preemptions["recompute"],
            num_preemptions_swap=s.num_preemptions["swap"],
            kv_utilization_at_peak=self._kv_utilization_at_peak,
            num_steps=self.num_steps,
        )

    def reset_prefix_cache(self) -> None:
        self.kv_cache_manager.reset_prefix_cache()
        self.scheduler.prompt_logprobs_memo.clear()


class LLM:
    """Offline batch generation: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, **config_overrides) -> None:
        self.engine = LLMEngine(model_dir, config, **config_overrides)

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        lora_name: str | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(
                f"got {len(params_list)} SamplingParams for {len(prompts)} prompts: give one or one each"
            )
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            rid = f"generate-{next(self.engine._request_counter)}"
            ids.append(
                self.engine.add_request(
                    rid, prompt, p, lora_name=lora_name, priority=priority[i] if priority else 0
                )
            )
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[i] for i in ids]
