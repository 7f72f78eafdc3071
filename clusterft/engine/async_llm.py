"""AsyncLLM: the engine behind an asyncio front end (what the serving deployment wraps).

Steps run in a worker thread (`asyncio.to_thread`) so the event loop stays responsive; a lock keeps
add/abort and step from touching the engine at once. Each request's outputs flow into its own queue;
`add_request` returns an async iterator over them. Closing that iterator early (client disconnect)
aborts the request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from clusterft.engine.config import EngineConfig
from clusterft.engine.llm_engine import LLMEngine
from clusterft.engine.outputs import EngineStats, RequestOutput
from clusterft.engine.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, **config_overrides) -> None:
        self.engine = LLMEngine(model_dir, config, **config_overrides)
        self._lock = threading.Lock()
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop_task: asyncio.Task | None = None

    async def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request (ValueError for a bad one, raised here) and return its output stream."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, params, priority=priority, lora_name=lora_name)
        self._queues[request_id] = queue
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())
        return self._stream(request_id, queue)

    async def generate(self, request_id: str, prompt, params: SamplingParams | None = None, **kwargs):
        """`async for out in llm.generate(...)`: add_request and iterate in one call."""
        async for out in await self.add_request(request_id, prompt, params, **kwargs):
            yield out

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks return to the pool before this returns."""
        await asyncio.to_thread(self._locked, self.engine.abort_request, request_id)
        self._queues.pop(request_id, None)

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    async def _run_loop(self) -> None:
        while self._queues:
            outputs = await asyncio.to_thread(self._locked, self.engine.step)
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        del self._queues[out.request_id]
            await asyncio.sleep(0)

    def get_stats(self) -> EngineStats:
        with self._lock:
            return self.engine.get_stats()
