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

Following production, a replica also serves the canary the registry gives traffic (`clusterft registry
canary`): a second engine, loaded beside production's, and each request goes to one of the two by its
routing key (the x-session-id header, else one random key per HTTP request), sticky per session
(clusterft/registry/traffic.py). Chunks name the alias that served them. The replica counts its
canary's outcomes and rolls it back through the registry when the spec's canary policy says so
(clusterft/serve/canary.py); it stops routing to it first, so later requests never meet it.

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
from clusterft.registry.registry import Registry
from clusterft.registry.serving import (
    ServingRecord,
    remove_record,
    stale_after_s,
    write_record,
)
from clusterft.registry.traffic import TrafficSplit
from clusterft.serve.canary import Outcomes, error_verdict, eval_verdict, is_server_error
from clusterft.serve.model_source import AliasWatch, ModelVersion, tokenizer_fingerprint
from clusterft.serve.routing import routing_key
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
        # Before resolving: a reload issued after this moment may have missed the version resolved here.
        self.started_at = time.time()
        model = resolve(None)
        self.current = _Serving(model, make_loop(model), tokenizer_fingerprint(model.model_dir))
        self._retiring: list[_Serving] = []
        self._switch_lock = asyncio.Lock()  # one version is built at a time
        self._watch = AliasWatch(spec.registry) if spec.registry is not None else None
        # The alias's (target, number of moves) at the last poll: polling switches only when the alias
        # moves, so a version pinned by a reload (POST /v1/admin/reload {"version"}) stays until the
        # alias moves again (even away and back), and a target that failed to load is not retried
        # every poll.
        self._alias_seen = (model.version, self._watch.moves()) if self._watch is not None else None
        self.num_switches = 0
        self.num_load_failures = 0
        self.last_error: str | None = None
        self.last_switch: dict[str, Any] | None = None
        self.app, self.replica = identity or replica_identity()
        self._since = time.time()  # when the current version began serving here
        self._closed = False
        self._record_lock = threading.Lock()  # heartbeats write from a thread
        # The canary beside production (None: no split); `split` is what routes to it.
        self.canary: _Serving | None = None
        self.split: TrafficSplit | None = None
        self._vetoed: tuple[str, int] | None = None  # a split this replica rolled back: not resumed
        self._failed_canary: str | None = None
        self.outcomes = {"production": Outcomes(), "canary": Outcomes()}
        self.num_canary_rollbacks = 0
        self.last_canary_rollback: str | None = None
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
        session: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """EngineLoop.generate on the engine current at admission; every chunk names its version and
        alias. `tokenizer` is the fingerprint of the tokenizer the prompt was made with (None: token ids
        from the client): another than the version's is answered by one `tokenizer_changed` chunk.
        `session` is the routing key between production and canary (None: the HTTP request's key where
        the routes run in this process, else the request id's)."""
        key = session or routing_key() or request_id.rsplit("-", 1)[0]
        # picked and counted with no await in between: a switch can't slip in
        serving, alias = self._pick(key)
        if tokenizer is not None and tokenizer != serving.tokenizer:
            yield tokenizer_changed(serving.model.version)
            return
        serving.num_in_flight += 1
        failed = False
        try:
            async for chunk in serving.loop.generate(request_id, prompt_token_ids, params, model, priority):
                chunk["model_version"] = serving.model.version
                chunk["model_alias"] = alias
                failed = failed or is_server_error(chunk)
                yield chunk
        except Exception:
            failed = True
            raise
        finally:
            serving.num_in_flight -= 1
            if serving.num_in_flight == 0 and serving is not self.current and serving is not self.canary:
                serving.idle.set()
            self._count(serving, alias, failed)

    def _pick(self, key: str) -> tuple[_Serving, str]:
        """The engine (and alias) that serves routing key `key` now."""
        if self.canary is not None and self.split is not None and self.split.route(key) == "canary":
            return self.canary, "canary"
        return self.current, self.spec.registry.alias if self.spec.registry else "local"

    def _count(self, serving: _Serving, alias: str, failed: bool) -> None:
        """Note how a request ended; a canary past the policy's bounds is rolled back."""
        if alias != "canary":
            outcome = self.outcomes["production"]
        elif serving is self.canary:
            outcome = self.outcomes["canary"]
        else:
            return  # a canary already replaced or rolled back: its late requests change nothing
        outcome.requests += 1
        outcome.errors += failed
        if serving is self.canary and self.spec.registry is not None:
            reason = error_verdict(self.spec.registry.canary, outcome)
            if reason is not None:
                self._roll_back_canary(reason)

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
                target, moves, split = await asyncio.to_thread(self._read_registry)
            except Exception as exc:  # a half-written file on a flaky mount: look again next poll
                logger.warning("could not read the registry alias: %s", exc)
                continue
            moved, self._alias_seen = (target, moves) != self._alias_seen, (target, moves)
            if target is not None and moved and target != self.version:
                await self.reload(target)
            if split is not None:
                await self.follow_split(split)

    def _read_registry(self) -> tuple[str | None, int, TrafficSplit | None]:
        """One poll, in a thread: the followed alias's target and number of moves and, following
        production, the traffic split (one stat of the aliases file; a read only when it changed)."""
        assert self._watch is not None
        return self._watch.poll()

    # ---- the canary ------------------------------------------------------------------------------
    async def follow_split(self, split: TrafficSplit) -> None:
        """Serve the canary of `split` beside production (loading it first), change its weight, or
        retire it, as the registry says. A canary that fails to load, or fails the eval gate, gets
        no traffic here; production serves everything meanwhile."""
        assert self.spec.registry is not None
        state = (split.canary, split.canary_weight)
        if self._vetoed is not None and state != self._vetoed:
            self._vetoed = None  # the registry moved on (rolled back, or set anew): follow it
        wanted = (
            split.canary if split.active and split.canary != self.version and self._vetoed is None else None
        )
        if wanted is None:
            self._retire_canary()
            return
        if self.canary is None or self.canary.model.version != wanted:
            if wanted == self._failed_canary:
                return
            async with self._switch_lock:
                reason = await asyncio.to_thread(self._eval_gate, wanted)
                if reason is not None:
                    self._retire_canary()
                    self._roll_back_canary(reason, state)
                    return
                try:
                    new = await self._load(await asyncio.to_thread(self._resolve, wanted))
                except Exception as exc:
                    self.num_load_failures += 1
                    self._failed_canary = wanted
                    self.last_error = f"canary {wanted}: {type(exc).__name__}: {exc}"
                    logger.error("could not load %s; production serves everything", self.last_error)
                    return
                self._retire_canary()
                self.canary, self._failed_canary = new, None
                self.outcomes["canary"] = Outcomes()
                logger.info("canary %s %s loaded beside %s", self.spec.model_name, wanted, self.version)
        self.split = split

    def _eval_gate(self, canary: str) -> str | None:
        """Why `canary`'s eval results rule it out against production's (None: they don't)."""
        assert self.spec.registry is not None and self.version is not None
        registry = Registry(self.spec.registry.root)
        name = self.spec.registry.model_name
        canary_eval = dict(registry.show(name, canary).manifest.eval)
        return eval_verdict(
            self.spec.registry.canary, canary_eval, dict(registry.show(name, self.version).manifest.eval)
        )

    def _retire_canary(self) -> None:
        """Route nothing more to the canary; free its engine once its requests have finished."""
        self.split = None
        old, self.canary = self.canary, None
        if old is not None:
            self._retiring.append(old)
            asyncio.get_running_loop().create_task(self._release(old))

    def _roll_back_canary(self, reason: str, state: tuple[str | None, int] | None = None) -> None:
        """Stop routing to the canary here at once, then set its weight to 0 in the registry (in a
        thread; a failed write is logged, and this replica keeps it off until the registry moves)."""
        assert self.spec.registry is not None
        if state is None:
            assert self.split is not None
            state = (self.split.canary, self.split.canary_weight)
        self._vetoed = state  # type: ignore[assignment]
        self._retire_canary()
        self.num_canary_rollbacks += 1
        self.last_canary_rollback = reason
        logger.warning("%s: %s", self.spec.model_name, reason)
        source = self.spec.registry
        asyncio.get_running_loop().create_task(
            asyncio.to_thread(_abort_in_registry, source.root, source.model_name, reason)
        )

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
                if self.canary is not None and self.canary.model.version == model.version:
                    new, self.canary, self.split = self.canary, None, None  # the promoted canary
                else:
                    logger.info(
                        "loading %s %s while %s serves", self.spec.model_name, model.version, previous
                    )
                    new = await self._load(model)
            except Exception as exc:
                self.num_load_failures += 1
                target = model.version if model is not None else ref or "the alias target"
                self.last_error = f"{target}: {type(exc).__name__}: {exc}"
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
            self.last_error = None
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

    async def _load(self, model: ModelVersion) -> _Serving:
        """An engine for `model`, with its tokenizer's fingerprint (off the event loop)."""
        tokenizer = await asyncio.to_thread(tokenizer_fingerprint, model.model_dir)
        return _Serving(model, await asyncio.to_thread(self._make_loop, model), tokenizer)

    async def _release(self, old: _Serving) -> None:
        """Free the old engine once its last request has finished on it."""
        while old.num_in_flight:
            old.idle.clear()  # set earlier by a request that ended while it still served
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
            "canary": self.canary_status(),
        }

    def canary_status(self) -> dict[str, Any]:
        """The canary this replica serves (None), its weight, and how requests ended per alias."""
        return {
            "version": self.canary.model.version if self.canary else None,
            "weight": self.split.canary_weight if self.split and self.canary else 0,
            "outcomes": {alias: vars(o).copy() for alias, o in self.outcomes.items()},
            "num_rollbacks": self.num_canary_rollbacks,
            "last_rollback": self.last_canary_rollback,
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


def _abort_in_registry(root: str, model_name: str, reason: str) -> None:
    try:
        Registry(root).abort_canary(model_name, reason)
    except Exception as exc:  # storage down: this replica keeps the canary off regardless
        logger.error("could not record the canary rollback of %s in the registry: %s", model_name, exc)


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
