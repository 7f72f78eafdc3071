"""The engine's asyncio front end (no Ray): admission, the step loop, and a stream per request.

    caller --generate(ids, params)--> EngineLoop.generate ---add_request---> engine (scheduler)
       ^                                   |  queue per request                    | step() in a thread
       +------ {"outputs": [delta...]} ----+<------------- RequestOutput ----------+

Engine outputs are cumulative, so a stream may skip any of them: the step loop hands a request's
output to its stream only every `stream_interval` tokens (the first token and the finished output at
once), and a consumer that falls behind takes only the newest one from its queue. Either way one
message carries several tokens: per-token message hops are what a small model's serving pays for.
A step that raises (a tensor-parallel worker died) fails exactly the requests in flight, with the
reason, and the engine is rebuilt before the next request is stepped. Closing a stream early (the
client went away) aborts its request, which frees its KV blocks.

New requests and aborts go through an inbox that the step thread empties before each step, so the
event loop never waits on the engine lock for a step to end: it serves HTTP while the engine steps
(a request the engine refuses gets its 400 on its stream, from the step thread).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from clusterft.engine.core_process import EngineCoreClient, EngineCoreDied
from clusterft.engine.llm_engine import LLMEngine
from clusterft.engine.outputs import RequestOutput
from clusterft.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """One request's channel from the step loop to its generate() consumer."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    num_tokens_sent: int = 0  # tokens of the longest sequence when an output was last queued

    def offer(self, out: RequestOutput, stream_interval: int) -> None:
        """Queue `out` if it finishes the request, carries the first tokens, or `stream_interval` new
        ones (n > 1: the longest sequence's; every sequence gains one per step)."""
        num_tokens = max((len(o.token_ids) for o in out.outputs), default=0)
        new = num_tokens - self.num_tokens_sent
        if out.finished or (new > 0 and (self.num_tokens_sent == 0 or new >= stream_interval)):
            self.num_tokens_sent = num_tokens
            self.queue.put_nowait(out)


def request_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """A request's failure as its stream carries it: the HTTP status it means, a message naming the
    problem, and the request field concerned (the HTTP edge turns it into OpenAI's error body)."""
    return {"error": {"status": status, "message": message, "param": param}}


def adapter_conflict(name: str, base_model: str, adapters: Iterable[str]) -> dict[str, Any] | None:
    """Why adapter `name` can't be added, else None: the one name rule every place that adds an
    adapter applies (the engine loop, the admin record, the serve spec). 400 for an empty name or one
    with '@', which is reserved: `<model>@<version>` is the internal adapter of a registered adapter
    version, the one base-model requests use, and taking its name would hijack them; 409 for a name
    the base model or a served adapter already has."""
    if not name.strip():
        return request_error(400, "the adapter name is empty: give a model id such as 'sql-lora'", "name")
    if "@" in name:
        return request_error(
            400,
            f"adapter name `{name}`: '@' is reserved (`<model>@<version>` names registered adapter "
            "versions); choose a name without '@'",
            "name",
        )
    if name == base_model or name in adapters:
        return request_error(409, f"model `{name}` already exists; remove it first", "name")
    return None


class EngineLoop:
    """Plain asyncio object (no Ray): admission, the step loop, streaming deltas, adapters."""

    def __init__(
        self,
        engine_factory: Callable[[], LLMEngine | EngineCoreClient],
        *,
        base_model: str,
        adapters: Mapping[str, str] | None = None,
        base_lora: str | None = None,
        max_queued_requests: int = 256,
        stream_interval: int = 1,
    ) -> None:
        """`engine_factory` builds the engine (again after a failed step); `base_model` is the name
        requests use for the base weights, `adapters` the LoRA names the factory's engine already
        serves, and `base_lora` a registered adapter version applied to base-model requests."""
        self._factory = engine_factory
        self.engine = engine_factory()
        self.base_model = base_model
        self.base_lora = base_lora
        self.max_queued_requests = max_queued_requests
        self.stream_interval = stream_interval
        self.adapters: dict[str, str] = dict(adapters or {})  # served now
        self._retiring: set[str] = set()  # removed from service, still used by requests in flight
        self._request_loras: dict[str, str | None] = {}
        self._lock = threading.Lock()  # engine calls happen on the loop thread and the step thread
        # ("add", request_id, ids, params, priority, lora_name, stream) | ("abort", request_id): applied
        # by whoever holds the lock next, before stepping (deque appends and pops are atomic).
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._num_waiting = 0  # after the last step; the admission bound counts the inbox's adds too
        self._loop: asyncio.AbstractEventLoop | None = None  # where streams live (set by generate)
        self._streams: dict[str, _Stream] = {}
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()  # cleared while a failed engine is being rebuilt
        self._ready.set()
        self.num_engine_failures = 0

    # ---- requests --------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str,
        priority: int = 0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Admit a request and stream {"outputs": [delta, ...], ...} dicts; an error is one {"error"} dict."""
        await self._ready.wait()
        lora_name = self.base_lora
        if model != self.base_model:
            if model not in self.adapters:
                yield request_error(404, f"The model `{model}` does not exist.", "model")
                return
            lora_name = model
        # list() copies the deque in one C call (the step thread may pop it meanwhile; iterating it
        # directly could raise "deque mutated during iteration").
        num_waiting = self._num_waiting + sum(1 for op in list(self._inbox) if op[0] == "add")
        if num_waiting >= self.max_queued_requests:
            yield request_error(
                503,
                f"server overloaded: {num_waiting} requests waiting (max_queued_requests="
                f"{self.max_queued_requests}); retry later",
            )
            return
        self._loop = asyncio.get_running_loop()
        queue = (stream := _Stream()).queue
        self._inbox.append(("add", request_id, prompt_token_ids, params, priority, lora_name, stream))
        self._streams[request_id] = stream
        self._request_loras[request_id] = lora_name
        if self._task is None or self._task.done():
            # A context of its own: the loop serves every request, not the one that started it. In a
            # Serve replica that request's context names its Ray task, which the step thread's Ray
            # calls (tensor-parallel workers) would inherit as their parent, so a client going away
            # would cancel them (Ray cancels a cancelled task's children) and fail every request.
            self._task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
        sent: dict[int, tuple[int, int]] = {}
        finished = False
        try:
            while not finished:
                item = await queue.get()
                while not queue.empty():  # cumulative outputs: the newest one says it all
                    item = queue.get_nowait()
                if isinstance(item, dict):  # the engine failed under this request
                    finished = True
                    yield item
                    return
                if (
                    item.finished
                    and item.finish_message
                    and all(o.finish_reason == "abort" for o in item.outputs)
                ):
                    finished = True  # the engine aborted this request only (its adapter, its sampling)
                    yield request_error(500, item.finish_message)
                    return
                finished = item.finished
                yield self._delta(item, sent, params)
        finally:
            self._request_loras.pop(request_id, None)
            self._streams.pop(request_id, None)
            if not finished:  # the client went away: free its blocks at the next step
                self._inbox.append(("abort", request_id))
                self._apply_inbox_unless_stepping(wait=False)  # no step running: free them now

    @staticmethod
    def _delta(
        out: RequestOutput, sent: dict[int, tuple[int, int]], params: SamplingParams
    ) -> dict[str, Any]:
        deltas = []
        first = not sent  # nothing streamed yet: the prompt's logprobs go with the first delta
        for o in out.outputs:
            num_text, num_tokens = sent.get(o.index, (0, 0))
            token_ids = list(o.token_ids[num_tokens:])  # one slice: the step thread may be appending
            logprobs = None
            if params.logprobs is not None and o.logprobs is not None:
                logprobs = list(o.logprobs[num_tokens : num_tokens + len(token_ids)])
                token_ids = token_ids[: len(logprobs)]
            finish = o.finish_reason if out.finished else None
            if not token_ids and len(o.text) == num_text and finish is None:
                continue
            sent[o.index] = (len(o.text), num_tokens + len(token_ids))
            deltas.append(
                {
                    "index": o.index,
                    "text": o.text[num_text:],
                    "token_ids": token_ids,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            )
        return {
            "outputs": deltas,
            "finished": out.finished,
            "prompt_tokens": len(out.prompt_token_ids),
            "cached_tokens": out.num_cached_tokens,
            "finish_message": out.finish_message,
            "prompt_logprobs": out.prompt_logprobs if first and deltas else None,
        }

    # ---- the step loop ---------------------------------------------------------------------------
    def _apply_inbox(self) -> None:
        """Hand the engine the requests and aborts that came since the last step; the caller holds
        the lock. A request the engine refuses (too long, unknown adapter) gets a 400 on its stream."""
        while self._inbox:
            op = self._inbox.popleft()
            if op[0] == "abort":
                try:
                    self.engine.abort_request(op[1])
                except EngineCoreDied as exc:  # nothing left to free; the next step rebuilds it
                    logger.warning("abort of %s: %s", op[1], exc)
                continue
            _, request_id, ids, params, priority, lora_name, stream = op
            try:
                self.engine.add_request(request_id, ids, params, priority=priority, lora_name=lora_name)
            except ValueError as exc:
                self._refuse(stream, exc)

    def _apply_inbox_unless_stepping(self, wait: bool) -> None:
        """Apply the inbox now if no step holds the lock (or, with `wait`, once none does)."""
        if self._lock.acquire(blocking=wait):
            try:
                self._apply_inbox()
            finally:
                self._lock.release()

    def _refuse(self, stream: _Stream | None, exc: Exception) -> None:
        """Fail a request the engine would not take (from the step thread): a ValueError is the
        request's fault (400), anything else the server's (500)."""
        if stream is not None and self._loop is not None:
            status = 400 if isinstance(exc, ValueError) else 500
            self._loop.call_soon_threadsafe(stream.queue.put_nowait, request_error(status, str(exc)))

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            self._apply_inbox()
            outputs = self.engine.step()
            self._num_waiting = self.engine.num_waiting()  # not get_stats: this is every step
            if isinstance(self.engine, EngineCoreClient):  # its refusals come with a step
                for request_id, exc in self.engine.take_rejected():
                    self._refuse(self._streams.get(request_id), exc)
            return outputs

    async def _run(self) -> None:
        try:
            await self._step_while_streaming()
        finally:
            self._apply_inbox_unless_stepping(wait=True)  # aborts of the last streams

    async def _step_while_streaming(self) -> None:
        while self._streams:
            try:
                outputs = await asyncio.to_thread(self._step)
            except Exception as exc:
                await self._recover(exc)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.offer(out, self.stream_interval)
            if self._retiring:
                self._retire_adapters()
            await asyncio.sleep(0)

    async def _recover(self, exc: Exception) -> None:
        """Fail every request in flight with the reason, then rebuild the engine (new workers); new
        requests wait for the rebuild instead of landing in the broken engine."""
        self.num_engine_failures += 1
        logger.error(
            "engine step failed; failing %d requests in flight, rebuilding: %s", len(self._streams), exc
        )
        message = f"the engine failed while running this request ({exc}); it was aborted, retry it"
        for stream in self._streams.values():
            stream.queue.put_nowait(request_error(503, message))
        self._streams.clear()
        self._inbox.clear()  # their adds and aborts were for the failed engine
        self._ready.clear()
        try:
            self.engine.shutdown()
            self.engine = await asyncio.to_thread(self._factory)
            served = set(self.engine.list_loras())
            for name, path in self.adapters.items():
                if name not in served:
                    self.engine.add_lora(name, path)
        finally:
            self._ready.set()

    # ---- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> dict[str, Any] | None:
        """Serve adapter `name` from `path`; an error chunk when that can't be done."""
        conflict = adapter_conflict(name, self.base_model, [*self.adapters, *self._retiring])
        if conflict is not None:
            return conflict
        with self._lock:
            try:
                self.engine.add_lora(name, path)
            except (FileNotFoundError, ValueError) as exc:
                return request_error(400, str(exc), "path")
        self.adapters[name] = path
        return None

    def remove_adapter(self, name: str) -> dict[str, Any] | None:
        """Stop serving `name` now; it is unloaded once no request in flight uses it."""
        if name not in self.adapters:
            return request_error(404, f"adapter `{name}` does not exist", "name")
        del self.adapters[name]
        self._retiring.add(name)
        self._retire_adapters()
        return None

    def _retire_adapters(self) -> None:
        in_use = set(self._request_loras.values())
        with self._lock:
            for name in [n for n in self._retiring if n not in in_use]:
                # A sharded engine tells its workers. The prefix cache stays: its blocks are keyed by
                # the adapter's bytes, so a later adapter of that name hits them only if it is the same.
                self.engine.remove_lora(name)
                self._retiring.discard(name)

    # ---- introspection ---------------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "adapters": dict(self.adapters),
            "max_model_len": self.engine.max_model_len,
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = asdict(self.engine.get_stats())
        stats["num_engine_failures"] = self.num_engine_failures
        stats["num_streams"] = len(self._streams)
        return stats

    def shutdown(self) -> None:
        """Stop the engine (a sharded one stops its workers); call once no request uses it."""
        self.engine.shutdown()

    def check_health(self) -> None:
        """Raise when the replica can't serve; Serve then replaces it."""
        if not self._streams:  # busy engines prove their health by stepping
            with self._lock:
                self.engine.check_health()
