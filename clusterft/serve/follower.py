"""Follow a registry alias with zero failed requests: one engine per model version, switched atomically.

    alias moves ─► build the new version's EngineLoop in a thread ─► swap `current` (one assignment)
                   (the old one keeps serving meanwhile)              │
                                                                       ▼
    new requests ─► current            requests already on the old engine finish there ─► release it

A request picks its engine when it is admitted and stays on it, so no request ever sees two sets of
weights. A prompt comes tokenized by the ingress, which names the tokenizer it used (a fingerprint of
the tokenizer files); one tokenized for another tokenizer than the admitting version's is sent back
(`tokenizer_changed`) for the ingress to tokenize again, so a version with added tokens never runs
token ids meant for another. Each version has its own engine, hence its own prefix cache, and its
block hashes carry the version number as weight version: KV of one version is never reused by
another. A version that fails to load leaves the old one serving; the error is logged, counted and
shown by /health.

A follower of a registry alias also keeps a serving record (clusterft/registry/serving.py) next to
the registry's versions: written at start, after every switch and at every poll (the heartbeat),
removed by `close()`. The job controller reads it to move the version's job to `serving`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from clusterft.engine import SamplingParams
from clusterft.engine.async_llm import EngineLoop
from clusterft.registry.serving import (
    ServingRecord,
    remove_record,
    stale_after_s,
    write_record,
)
from clusterft.serve.model_source import AliasWatch, ModelVersion, tokenizer_fingerprint
from clusterft.serve.spec import ServeSpec

logger = logging.getLogger(__name__)


@dataclass
class _Serving:
    """One version's engine and how many requests are still on it."""

    model: ModelVersion
    loop: EngineLoop
    tokenizer: str  # tokenizer_fingerprint of its model dir
    num_in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set once retired and empty


class ModelFollower:
    """Plain asyncio object (no Serve): serves the current version and switches to another one."""

    def __init__(
        self,
        spec: ServeSpec,
        resolve: Callable[[str | None], ModelVersion],
        make_loop: Callable[[ModelVersion], EngineLoop],
        identity: tuple[str, str] | None = None,
    ) -> None:
        """`resolve(ref)` turns a version ref (None: the followed alias now) into a ModelVersion;
        `make_loop` builds that version's engine loop (slow: it loads the weights). `identity` is
        (app, replica id) for the serving record; default: the Serve replica's own."""
        self.spec = spec
        self._resolve = resolve
        self._make_loop = make_loop
        model = resolve(None)
        self.current = _Serving(model, make_loop(model), tokenizer_fingerprint(model.model_dir))
        self._retiring: list[_Serving] = []
        self._switch_lock = asyncio.Lock()  # one version is built at a time
        self._watch = AliasWatch(spec.registry) if spec.registry is not None else None
        self._failed_target: str | None = None  # not retried by polling until the alias moves again
        self.num_switches = 0
        self.num_load_failures = 0
        self.last_error: str | None = None
        self.last_switch: dict[str, Any] | None = None
        self.app, self.replica = identity or replica_identity()
        self._since = time.time()  # when the current version began serving here
        self._closed = False
        self._record_lock = threading.Lock()  # heartbeats write from a thread
        self._publish()

    @property
    def version(self) -> str | None:
        return self.current.model.version

    # ---- requests --------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str,
        priority: int,
        tokenizer: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """EngineLoop.generate on the engine current at admission; every chunk names its version.
        `tokenizer` is the fingerprint of the tokenizer the prompt was made with (None: token ids from
        the client): another than the current version's is answered by one `tokenizer_changed` chunk."""
        serving = self.current  # picked and counted with no await in between: a switch can't slip in
        if tokenizer is not None and tokenizer != serving.tokenizer:
            yield tokenizer_changed(serving.model.version)
            return
        serving.num_in_flight += 1
        try:
            async for chunk in serving.loop.generate(request_id, prompt_token_ids, params, model, priority):
                chunk["model_version"] = serving.model.version
                yield chunk
        finally:
            serving.num_in_flight -= 1
            if serving.num_in_flight == 0 and serving is not self.current:
                serving.idle.set()

    # ---- switching -------------------------------------------------------------------------------
    async def watch(self) -> None:
        """Poll the alias forever and switch when it points somewhere new; beside it, refresh the
        serving record at the same interval, so a long model load does not stop the heartbeat
        (the replica's background task). Cancelling it removes the record."""
        try:
            await asyncio.gather(self._follow(), self._heartbeat())
        finally:
            self.close()

    async def _follow(self) -> None:
        assert self._watch is not None and self.spec.registry is not None
        while True:
            await asyncio.sleep(self.spec.registry.poll_interval_s)
            try:
                target = await asyncio.to_thread(self._watch.target)
            except Exception as exc:  # a half-written file on a flaky mount: look again next poll
                logger.warning("could not read the registry alias: %s", exc)
                continue
            if target is not None and target not in (self.version, self._failed_target):
                await self.reload(target)

    async def _heartbeat(self) -> None:
        assert self.spec.registry is not None
        while not self._closed:
            await asyncio.sleep(self.spec.registry.poll_interval_s)
            await asyncio.to_thread(self._publish)

    async def reload(self, ref: str | None = None) -> dict[str, Any]:
        """Switch to version `ref` (default: where the followed alias points now) unless already
        serving it. Returns {"version", "previous", "switched", "error", "load_s"}; on error the old
        version keeps serving."""
        async with self._switch_lock:
            previous = self.version
            started = time.monotonic()
            model: ModelVersion | None = None
            try:
                model = await asyncio.to_thread(self._resolve, ref)
                if model.version == previous:
                    return self.unchanged()
                logger.info("loading %s %s while %s serves", self.spec.model_name, model.version, previous)
                tokenizer = await asyncio.to_thread(tokenizer_fingerprint, model.model_dir)
                new = _Serving(model, await asyncio.to_thread(self._make_loop, model), tokenizer)
            except Exception as exc:
                self.num_load_failures += 1
                target = model.version if model is not None else ref or "the alias target"
                self.last_error = f"{target}: {type(exc).__name__}: {exc}"
                self._failed_target = model.version if model is not None else ref
                logger.error("could not load %s; still serving %s", self.last_error, previous)
                return reload_result(previous, previous, False, self.last_error, time.monotonic() - started)
            dropped: dict[str, str] = {}  # runtime adapters stay served, where they fit the new weights
            for name, path in self.current.loop.adapters.items():
                if name not in new.loop.adapters:
                    error = new.loop.add_adapter(name, path)
                    if error is not None:
                        dropped[name] = error["error"]["message"]
            old, self.current = self.current, new
            self._since = time.time()
            self.num_switches += 1
            self.last_error = self._failed_target = None
            load_s = time.monotonic() - started
            self.last_switch = reload_result(model.version, previous, True, None, load_s)
            if dropped:  # said in the reload's answer and /health, not only in the log
                self.last_switch["dropped_adapters"] = dropped
                logger.warning(
                    "adapters %s do not fit %s and are no longer served", sorted(dropped), model.version
                )
            logger.info("now serving %s %s (loaded in %.2fs)", self.spec.model_name, model.version, load_s)
            self._retiring.append(old)
            asyncio.get_running_loop().create_task(self._release(old))
            await asyncio.to_thread(self._publish)
            return self.last_switch

    async def _release(self, old: _Serving) -> None:
        """Free the old engine once its last request has finished on it."""
        if old.num_in_flight:
            await old.idle.wait()
        await asyncio.to_thread(old.loop.shutdown)  # a sharded engine stops its workers
        self._retiring.remove(old)
        logger.info("released %s %s", self.spec.model_name, old.model.version)

    # ---- the serving record ----------------------------------------------------------------------
    def record(self) -> ServingRecord | None:
        """What this replica serves, as the controller reads it; None when not following a registry."""
        source = self.spec.registry
        if source is None or self.version is None:
            return None
        return ServingRecord(
            model_name=source.model_name,
            version=self.version,
            alias=source.alias,
            app=self.app,
            replica=self.replica,
            host=socket.gethostname(),
            pid=os.getpid(),
            since=self._since,
            heartbeat_at=time.time(),
            stale_after_s=stale_after_s(source.poll_interval_s),
        )

    def _publish(self) -> None:
        """Write the record; a storage hiccup is logged, never fails serving (the record goes stale).
        Under a lock, so a heartbeat that read the old version cannot land after a switch's write."""
        with self._record_lock:
            record, source = self.record(), self.spec.registry
            if record is None or source is None or self._closed:
                return
            try:
                write_record(source.root, record)
            except OSError as exc:
                logger.warning("could not write the serving record: %s", exc)

    def close(self) -> None:
        """Remove the serving record and write no more (a clean shutdown of the replica)."""
        with self._record_lock:
            self._closed = True
            source = self.spec.registry
            if source is None:
                return
            try:
                remove_record(source.root, source.model_name, self.replica)
            except OSError as exc:
                logger.warning("could not remove the serving record: %s", exc)

    def unchanged(self) -> dict[str, Any]:
        """A reload's result when nothing was switched: the current version stays."""
        return reload_result(self.version, self.version, False, None, 0.0)

    # ---- adapters (runtime LoRA, on the current version's loop) -----------------------------------
    @property
    def adapters(self) -> dict[str, str]:
        """Runtime adapters served now, name -> path."""
        return dict(self.current.loop.adapters)

    def add_adapter(self, name: str, path: str) -> dict[str, Any] | None:
        return self.current.loop.add_adapter(name, path)

    def remove_adapter(self, name: str) -> dict[str, Any] | None:
        return self.current.loop.remove_adapter(name)

    # ---- introspection ---------------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        info = self.current.loop.model_info()
        info["version"] = self.version
        info["root"] = self.current.model.adapter_dir or self.current.model.model_dir
        return info

    def status(self) -> dict[str, Any]:
        """The version story for /health and metrics: what serves, what drains, the last error."""
        return {
            "model": self.spec.model_name,
            "version": self.version,
            "alias": self.spec.registry.alias if self.spec.registry else None,
            "draining": [s.model.version for s in self._retiring],
            "num_switches": self.num_switches,
            "num_load_failures": self.num_load_failures,
            "last_error": self.last_error,
            "last_switch": self.last_switch,
        }

    def stats(self) -> dict[str, Any]:
        """The current engine's stats, with its KV pool's size and the version story's counters."""
        stats = self.current.loop.stats()
        stats["num_kv_blocks"] = self.current.loop.engine.num_gpu_blocks
        stats["model_weight_version"] = self.current.model.weight_version
        stats["num_model_switches"] = self.num_switches
        stats["num_model_load_failures"] = self.num_load_failures
        return stats

    def check_health(self) -> None:
        self.current.loop.check_health()


def reload_result(
    version: str | None, previous: str | None, switched: bool, error: str | None, load_s: float
) -> dict[str, Any]:
    """What a reload (or an alias switch) did, as admin calls and /health report it."""
    return {
        "version": version,
        "previous": previous,
        "switched": switched,
        "error": error,
        "load_s": round(load_s, 3),
    }


def tokenizer_changed(version: str | None) -> dict[str, Any]:
    """The one chunk of a request whose prompt was tokenized for another tokenizer than `version`'s
    (the ingress tokenizes it again; a client sees the 503 only where that can't be done)."""
    return {
        "error": {
            "status": 503,
            "message": f"the served model version changed to {version}, which tokenizes differently, "
            "while this request was sent; retry it",
            "param": None,
        },
        "tokenizer_changed": True,
        "model_version": version,
    }


def replica_identity() -> tuple[str, str]:
    """(app, replica id) of the calling Serve replica; outside Serve, ("local", host-pid)."""
    try:
        from ray import serve

        context = serve.get_replica_context()
    except Exception:  # not in a replica (or no Ray at all): a plain process
        return "local", f"{socket.gethostname()}-{os.getpid()}"
    return context.app_name, f"{context.app_name}#{context.deployment}#{context.replica_id.unique_id}"
