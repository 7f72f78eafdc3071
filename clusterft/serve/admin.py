"""Admin changes (runtime LoRA adapters, reload) reach every engine replica: a desired-state record
that each replica reconciles, and an admin call that waits until every live replica has applied it.

    POST/DELETE /v1/admin/adapters, POST /v1/admin/reload
      ingress ──change──► AdminRecord (one per app and spec: a detached named actor) ─► generation g
         │                      ▲  sync(replica, applied generation, errors, reload result)
         │                      │  ◄── the desired state, when newer than what the replica applied
         └─ waits until every live replica reports g (bounded), then answers with their errors
            (a reload: the one version they all serve now, else an error naming who serves what)
      engine replica, every SYNC_INTERVAL_S: sync ─► Reconciler.apply(desired) on its current loop
      GET /metrics: the engine stats each live replica sent with its last sync (at most that old)

Why a record and not a call per replica: a Serve handle sends each call to one replica of its choice
and has no public way to address them all, and a broadcast would miss replicas that start later (the
replacement of a crashed replica, a scale-up), which the record reaches at their first sync. A
replica is live while it syncs (within STALE_AFTER_S); a dead one stops being waited for.

A runtime adapter is read only from under the spec's `adapter_roots` (symlinks resolved; none: runtime
adapters are refused, 403), so an admin call can't make replicas read arbitrary files; the record
refuses others before any replica sees them, and each replica's engine checks the adapter against its
base model before the call answers (a broken one: 400, taken back from the record).

Adapters are state: a replica's served set is made equal to the record's, whenever it started. A
reload is a command: replicas live when it was issued run it once. A replica's first sync can come
after a reload although the replica started before it (the record is started lazily and runs its
calls out of order), so at its first sync a replica runs the newest reload of the alias anyway (it
re-reads where the alias points: at worst a no-op) and a reload of a pinned version when it was
issued after the replica started; a replica started later skips that one and the reload's answer
says so. The record is detached (it must outlive every replica); it exits by itself once no replica
has synced for IDLE_EXIT_S (the app was deleted or redeployed with another spec, which gets a record
of its own).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clusterft.engine.async_llm import adapter_conflict
from clusterft.serve.errors import APIError

if TYPE_CHECKING:
    from clusterft.serve.follower import ModelFollower
    from clusterft.serve.spec import ServeSpec

logger = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.2
STALE_AFTER_S = 5.0
IDLE_EXIT_S = 600.0
APPLY_TIMEOUT_S = 120.0  # a reload loads a model version


@dataclass
class ReplicaReport:
    applied: int  # the generation whose state the replica serves
    last_sync: float
    errors: list[str] = field(default_factory=list)  # what failed applying `applied`
    reload_result: dict[str, Any] | None = None  # of the last reload command it ran; None: none
    stats: dict[str, Any] | None = None  # its engine's stats at this sync (ModelFollower.stats)


@dataclass
class AdminState:
    """The record's content and decisions (no Ray): the desired adapters, the newest reload command,
    and what each replica has applied."""

    base_model: str
    adapters: dict[str, str]
    adapter_roots: tuple[str, ...] = ()  # where runtime adapters may come from (ServeSpec.adapter_roots)
    generation: int = 0
    reload_generation: int = 0  # the generation that issued the newest reload; 0: none
    reload_ref: str | None = None
    reload_issued_at: float = 0.0  # time.time() of the newest reload
    replicas: dict[str, ReplicaReport] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    # ---- changes (each one a new generation) ----------------------------------------------------
    def add_adapter(self, name: str, path: str) -> int:
        conflict = adapter_conflict(name, self.base_model, self.adapters)
        if conflict is not None:
            raise APIError.from_chunk(conflict)
        check_adapter_root(path, self.adapter_roots)
        self.adapters[name] = path
        return self._bump()

    def remove_adapter(self, name: str) -> int:
        if self.adapters.pop(name, None) is None:
            raise APIError(404, f"adapter `{name}` does not exist", "name")
        return self._bump()

    def reload(self, ref: str | None, now: float | None = None) -> int:
        self.reload_ref = ref
        self.reload_issued_at = time.time() if now is None else now
        self.reload_generation = self._bump()
        return self.reload_generation

    def _bump(self) -> int:
        self.generation += 1
        return self.generation

    # ---- replicas -------------------------------------------------------------------------------
    def desired(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "adapters": dict(self.adapters),
            "reload_generation": self.reload_generation,
            "reload_ref": self.reload_ref,
            "reload_issued_at": self.reload_issued_at,
        }

    def sync(
        self,
        replica: str,
        applied: int,
        errors: list[str],
        reload_result: dict | None,
        now: float,
        stats: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Record what `replica` has applied (and its engine's stats); the desired state if it has not
        applied the newest."""
        self.replicas[replica] = ReplicaReport(applied, now, errors, reload_result, stats)
        return self.desired() if applied < self.generation else None

    def live(self, now: float) -> dict[str, ReplicaReport]:
        return {r: rep for r, rep in self.replicas.items() if now - rep.last_sync <= STALE_AFTER_S}

    def engine_stats(self, now: float) -> dict[str, dict[str, Any]]:
        """Replica -> its engine's stats, of every live replica that has sent them."""
        return {r: rep.stats for r, rep in self.live(now).items() if rep.stats is not None}

    def progress(self, generation: int, now: float) -> dict[str, Any]:
        """Which live replicas have not applied `generation` yet; the errors of those that have, and
        the result of the last reload each of them ran (by replica; None: it has run none)."""
        live = self.live(now)
        done = {r: rep for r, rep in live.items() if rep.applied >= generation}
        return {
            "num_live": len(live),
            "pending": sorted(set(live) - set(done)),
            "errors": [e for rep in done.values() for e in rep.errors],
            "reload_results": {r: rep.reload_result for r, rep in sorted(done.items())},
        }

    def idle(self, now: float) -> bool:
        """True once no replica has synced for IDLE_EXIT_S: nobody serves this app any more."""
        last = max((rep.last_sync for rep in self.replicas.values()), default=self.created)
        return now - last > IDLE_EXIT_S


def check_adapter_root(path: str, roots: Sequence[str]) -> None:
    """The APIError for a runtime adapter `path` outside every root in `roots` (symlinks resolved, so
    a link under a root can't point elsewhere): 403 when there are no roots or it is outside them, 400
    for a relative path (replicas would each resolve it against their own working directory)."""
    if not roots:
        raise APIError(
            403,
            "runtime adapters are off: this server has no adapter roots; start it with --adapter-root DIR "
            "(adapter_roots: [DIR] in a serve config) and put adapters under DIR",
            "path",
        )
    if not os.path.isabs(path):
        raise APIError(400, f"path `{path}` is relative: give the adapter dir's absolute path", "path")
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real, real_root]) == real_root:
            return
    raise APIError(
        403,
        f"path `{path}` is outside the adapter roots {list(roots)}: put the adapter under one of them, or "
        "start the server with --adapter-root for its directory (adapter_roots in a serve config)",
        "path",
    )


class AdminRecord:
    """Ray actor shell around AdminState (see `record_handle`)."""

    def __init__(self, base_model: str, adapters: dict[str, str], adapter_roots: Sequence[str] = ()) -> None:
        self.state = AdminState(base_model, dict(adapters), tuple(adapter_roots))
        self._reaper: asyncio.Task | None = None

    async def _exit_when_idle(self) -> None:
        import ray

        while not self.state.idle(time.time()):
            await asyncio.sleep(IDLE_EXIT_S / 10)
        ray.kill(ray.get_runtime_context().current_actor)

    def change(self, op: str, *args: Any) -> int | dict[str, Any]:
        """`op` is add_adapter, remove_adapter or reload; the new generation, or an error dict."""
        try:
            return getattr(self.state, op)(*args)
        except APIError as exc:
            return exc.chunk()

    async def sync(
        self,
        replica: str,
        applied: int,
        errors: list[str],
        reload_result: dict | None,
        stats: dict[str, Any] | None = None,
    ):
        if self._reaper is None:  # started here: an async actor's methods run on its event loop
            self._reaper = asyncio.get_running_loop().create_task(self._exit_when_idle())
        return self.state.sync(replica, applied, errors, reload_result, time.time(), stats)

    def progress(self, generation: int) -> dict[str, Any]:
        return self.state.progress(generation, time.time())

    def engine_stats(self) -> dict[str, dict[str, Any]]:
        return self.state.engine_stats(time.time())


# The shape of AdminRecord's calls and replies. Bump it when they change: the record is detached and
# outlives a redeploy, and replicas of new code must not reach a record still running old code.
RECORD_PROTOCOL = 2  # 2: desired state carries reload_issued_at; progress maps replicas to results


def record_name(app_name: str, spec: ServeSpec) -> str:
    """One record per app, spec and protocol: a redeploy with another spec (or with code speaking
    another protocol) starts from the spec's adapters."""
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
    return f"clusterft-admin-{app_name}-p{RECORD_PROTOCOL}-{digest}"


def record_handle(spec: ServeSpec):
    """The app's record (created by whichever replica asks first; Serve's namespace)."""
    import ray
    from ray import serve

    actor = ray.remote(num_cpus=0, max_restarts=0)(AdminRecord)
    return actor.options(
        name=record_name(serve.get_replica_context().app_name, spec),
        namespace="serve",
        lifetime="detached",
        get_if_exists=True,
    ).remote(spec.model_name, dict(spec.adapters), list(spec.adapter_roots))


class Reconciler:
    """An engine replica's side: make its follower's current loop serve the desired state."""

    def __init__(self, follower: ModelFollower) -> None:
        self.follower = follower
        self.record_epoch = 0  # bumped by forget_record: an apply begun before then reports nothing
        self.forget_record()

    def forget_record(self) -> None:
        """Start over with a new record (the old one is gone): its generations are not the old's."""
        self.record_epoch += 1
        self.applied = -1  # -1: never synced; the first desired state is always applied
        self.errors: list[str] = []
        self.reload_result: dict[str, Any] | None = None  # of the last reload run; None: none yet
        self._reload_seen: int | None = None  # None until the first sync

    def _runs_reload(self, desired: dict[str, Any]) -> bool:
        """Whether the record's newest reload is this replica's to run now. At the first sync the
        replica can't tell whether it was live when the reload was issued (its first sync may come
        seconds after it started), so: a reload of the alias always (re-resolving it is right either
        way, and the reload's answer then names what the alias points at now, not what it pointed at
        when this replica started); a pinned version only when issued after the replica started (an
        older pin is not brought back by a replacement replica; the record's and the replica's wall
        clocks are compared, so within their skew either answer is one a reload may give)."""
        generation = desired["reload_generation"]
        if self._reload_seen is not None:
            return generation > self._reload_seen
        if generation == 0:
            return False
        return desired["reload_ref"] is None or desired["reload_issued_at"] >= self.follower.started_at

    async def apply(self, desired: dict[str, Any]) -> None:
        errors: list[str] = []
        if self._runs_reload(desired):
            epoch = self.record_epoch
            result = await self.follower.reload(desired["reload_ref"])
            if epoch != self.record_epoch:
                # The record was lost during the reload: this state was the old record's. Writing its
                # generation back would tell the new record a state it never had was applied (its own
                # changes up to that generation would then never reach this replica).
                return
            self.reload_result = result
            if self.reload_result["error"]:
                errors.append(f"could not load {self.reload_result['error']}")
        self._reload_seen = desired["reload_generation"]
        served, wanted = self.follower.adapters, desired["adapters"]
        for name in [n for n in served if wanted.get(n) != served[n]]:
            self.follower.remove_adapter(name)
        for name, path in wanted.items():
            if name in served and served[name] == path:
                continue
            error = self.follower.add_adapter(name, path)
            if error is not None:
                if error["error"]["status"] == 409:  # still unloading the old one: next sync
                    return
                errors.append(error["error"]["message"])
        self.applied, self.errors = desired["generation"], errors


async def sync_forever(
    spec: ServeSpec, replica: str, reconciler: Reconciler, stats: Callable[[], dict[str, Any]]
) -> None:
    """The engine replica's background task: report every SYNC_INTERVAL_S, with `stats()` of its
    engine (for /metrics), and reconcile when the record has news. Applying runs beside the reports,
    so a long reload never looks like a dead replica. A lost record is created anew from the spec,
    and the replica reconciles to it."""
    from ray.exceptions import RayActorError

    record = record_handle(spec)
    applying: asyncio.Task | None = None
    while True:
        try:
            # In a thread: the engine's lock is held through each step, and the loop must not wait.
            snapshot = await asyncio.to_thread(stats)
        except Exception:  # an engine being rebuilt: the sync goes on without stats
            logger.exception("could not read the engine's stats")
            snapshot = None
        try:
            desired = await record.sync.remote(
                replica, reconciler.applied, reconciler.errors, reconciler.reload_result, snapshot
            )
            if desired is not None and (applying is None or applying.done()):
                applying = asyncio.get_running_loop().create_task(reconciler.apply(desired))
        except RayActorError:
            logger.exception("the admin record is gone; starting a new one from the spec")
            record = record_handle(spec)
            reconciler.forget_record()
        except Exception:  # a busy cluster: try again at the next sync
            logger.exception("admin record sync failed")
        await asyncio.sleep(SYNC_INTERVAL_S)


async def change_everywhere(record, op: str, *args: Any) -> dict[str, Any]:
    """Record a change and wait until every live engine replica has applied it; APIError for a
    refused change (409/404), a 503 when no replica is live, a 504 when some did not apply in time."""
    generation = await record.change.remote(op, *args)
    if isinstance(generation, dict):
        raise APIError.from_chunk(generation)
    started = time.monotonic()
    while True:
        progress = await record.progress.remote(generation)
        if progress["num_live"] and not progress["pending"]:
            return progress
        waited = time.monotonic() - started
        if not progress["num_live"] and waited > STALE_AFTER_S:
            raise APIError(
                503,
                "no engine replica is running; the change applies when one starts",
            )
        if waited > APPLY_TIMEOUT_S:
            raise APIError(
                504,
                f"engine replicas {progress['pending']} did not apply the change within "
                f"{APPLY_TIMEOUT_S:.0f}s; it is recorded and they apply it when they can",
            )
        await asyncio.sleep(SYNC_INTERVAL_S / 2)


def reload_answer(progress: dict[str, Any]) -> dict[str, Any]:
    """The answer to a reload that every live replica has applied (`progress` of its generation):
    the one version they all serve after it (the other fields: the first replica's). A 422 when one
    could not load the version (it still serves its old one); a 409 naming the replicas when they
    did not all run it or ended on different versions (the alias moved between their reloads): the
    first answer would name one replica's version as everyone's."""
    results: dict[str, dict[str, Any] | None] = progress["reload_results"]
    ran = {replica: result for replica, result in results.items() if result is not None}
    for result in ran.values():
        if result["error"]:
            raise APIError(
                422,
                f"could not load version {result['error']}; still serving {result['version']}",
                "version",
                code="version_load_failed",
            )
    skipped = sorted(set(results) - set(ran))
    if skipped:
        raise APIError(
            409,
            f"engine replicas {skipped} started after this reload was issued and did not run it (they "
            "serve the alias's version): send the reload again to switch them too",
            code="replicas_disagree",
        )
    replicas_by_version: dict[str | None, list[str]] = {}
    for replica, result in ran.items():
        replicas_by_version.setdefault(result["version"], []).append(replica)
    if len(replicas_by_version) > 1:
        serving = "; ".join(f"{version} on {replicas}" for version, replicas in replicas_by_version.items())
        raise APIError(
            409,
            f"engine replicas ended this reload on different versions ({serving}): the alias moved "
            "while they reloaded; send the reload again",
            code="replicas_disagree",
        )
    assert ran, "change_everywhere answers once a live replica has applied the reload"
    first = next(iter(ran.values()))
    return {**first, "num_replicas": progress["num_live"]}
