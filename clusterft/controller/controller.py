"""The job controller: every decision and effect that carries a job through its life, without Ray
(the detached actor that ticks it is actor.py).

    submitted ─► training ─► evaluating ─► registered ◄─► promoted ◄─► serving
                  │   ▲      (eval driver)  (registry)   (an alias    (a live replica
                  ▼   │                                   points here)  serves it)
                failed ─► resuming (backoff) ─► training, from the newest valid checkpoint

`Controller.tick()` reads every unsettled job from the job store and
moves it one step, using the pure policies for each decision; then it reconciles every job holding a
registry version with the registry's aliases and the replicas' serving records (`decide_serving`),
whoever moved the alias: this controller, `clusterft registry promote|rollback`, or another
cluster's controller on the same storage. The store, the run files and the registry are the only
state, so a killed actor (Ray restarts it: `max_restarts=-1`) re-reads them and continues: a
training driver that outlived it is re-attached, one that died is relaunched from its checkpoint.
User commands (submit, cancel, resume) write the store directly; the controller reconciles.

Several controllers may share one store (a restarted actor and its zombie predecessor, or a standby):
each acts only on the jobs whose lease it holds (`store.claim`, renewed every tick), leaves a job
leased by another live controller alone, and takes over one whose lease expired (or whose holder, on
this host, is dead) through the same re-attach path as a restart, so a live driver is never doubled.
Its store is fenced by its id: a write made after its lease was lost is refused (`LeaseLost`), and the
job forgotten here. Reconciling a registered job's state with the registry claims its lease too, and
registering a version holds the job's registration lock and checks the lease under it, so two
controllers never register one job twice.

No job is lost to another one: a job whose step fails is logged and tried again next tick, a row
the store cannot read is set aside (`_set_aside`), and a tick that fails as a whole (the store
locked or unreadable) is retried after a backoff by the actor's `supervise`, which ends the actor's
process after too many in a row so that Ray restarts it. Heavy I/O (hashing a checkpoint for
`resumed_from`, copying a model into the registry: registration.py) runs in a small thread pool,
never in the tick.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from clusterft.config.spec import JobSpec
from clusterft.controller.policy import (
    Complete,
    Failure,
    GiveUp,
    VersionState,
    check_completion,
    decide_after_failure,
    decide_serving,
    parse_gates,
)
from clusterft.controller.ray_jobs import RayJobs, pointer, submission_id
from clusterft.controller.registration import find_or_register, register_and_promote, registering
from clusterft.controller.runs import Phase, RunFiles, describe_exit, kill, kill_drivers, launch, pid_runs_job
from clusterft.controller.state import (
    HOLDS_VERSION,
    SETTLED,
    Errored,
    Evaluating,
    Failed,
    Job,
    JobState,
    Resuming,
    Training,
)
from clusterft.controller.store import JobStore, LeaseLost, StaleState, UnreadableJob
from clusterft.controller.store_backend import store_location
from clusterft.controller.store_rows import Lease, UnreadableRow
from clusterft.controller.stored_spec import SPEC_SCHEMA_VERSION, SpecSchemaError, job_spec
from clusterft.errors import UserError
from clusterft.registry.registry import AliasChange, Registry, Version, check_model_name
from clusterft.registry.serving import live_versions, read_records

logger = logging.getLogger(__name__)
T = TypeVar("T")


TRAIN_FACTS = ("planned_steps", "completed_steps", "final_loss", "checkpoint", "output", "wall_time_s")
IO_THREADS = 2
LEASE_S = 15.0
"""How long a controller's claim on a job lasts without renewal (it renews every tick): how long
a killed controller's jobs wait before another controller takes them over."""
"""Heavy I/O steps running at once (each a checkpoint to hash or a model to copy)."""


@dataclass
class _Run:
    files: RunFiles
    process: subprocess.Popen[bytes] | None  # None: a Ray job, or re-attached after a restart
    pid: int | None  # a driver process of this host
    submission: str | None = None  # a Ray job's submission id

    @property
    def name(self) -> str:
        return f"Ray job {self.submission}" if self.submission else f"pid {self.pid}"


@dataclass
class _Work:
    """Heavy I/O for one step of one job, running in the I/O pool."""

    key: tuple[str, float]
    """(step, the job's updated_at when it started): a job that moved since starts its step anew."""
    future: Future[Any]


class Controller:
    """Every decision and effect of the controller, without Ray (the actor calls `tick` in a loop).
    Its job store is SQLite in `root` unless `store_url` names another (a postgresql:// URL);
    `journal_mode` and `busy_timeout_s` are the store's (see store.py); `lease_s` is how long its
    claim on a job lasts unrenewed (`LEASE_S`). `ray_jobs`: the cluster's job server, through which
    the drivers run as Ray jobs (ray_jobs.py); None: as processes of this host (runs.py)."""

    def __init__(
        self,
        root: str | Path,
        registry_root: str | Path,
        *,
        env: dict[str, str] | None = None,
        store_url: str | None = None,
        journal_mode: Literal["wal", "delete"] | None = None,
        busy_timeout_s: float = 30.0,
        lease_s: float = LEASE_S,
        ray_jobs: RayJobs | None = None,
    ):
        if lease_s <= 0:
            raise UserError(f"lease_s must be positive (seconds a job's lease lasts unrenewed): {lease_s}")
        self.root = Path(root)
        self.id = uuid.uuid4().hex
        """This controller's lease holder id: one per instance, so a restart is another holder. Its
        store is fenced with it: every write to a job needs this id's live lease on the job."""
        self.store = JobStore(
            store_location(root, store_url),
            journal_mode=journal_mode,
            busy_timeout_s=busy_timeout_s,
            fence=self.id,
        )
        self.registry = Registry(registry_root)
        self.env = env if env is not None else dict(os.environ)
        self.ray_jobs = ray_jobs
        self.runs: dict[str, _Run] = {}
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="clusterft-io")
        self.work: dict[str, _Work] = {}
        self.unreadable: dict[str, str] = {}
        """Jobs whose stored spec this clusterft cannot read (newer schema, or invalid), and why."""
        self.unreadable_rows: dict[str, str] = {}
        """Jobs whose row the store cannot read and that are left alone, and why (said once)."""
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.lease_s = lease_s
        self.leased: set[str] = set()
        """Jobs whose lease this controller holds (claimed or renewed at its last tick)."""
        self.others: dict[str, str] = {}
        """Jobs leased by another live controller, and which one (said once in the log)."""

    def tick(self) -> None:
        """Set aside rows the store cannot read; stop runs of jobs that were cancelled meanwhile;
        move every unsettled job one step; then reconcile the jobs holding registry versions. A job
        whose step fails is logged and tried again next tick; a failing read of the store raises
        (`supervise` retries)."""
        for row in self.store.unreadable():
            try:
                self._set_aside(row)
            except Exception:
                logger.exception("controller: setting aside job %s", row.job_id)
        for job_id in self.runs.keys() | self.leased:  # a restarted controller's runs: leased
            try:
                job = self.store.get(job_id)
            except UnreadableJob:
                continue
            if job.status is JobState.CANCELLED:
                self._stop_drivers(job.id, job.attempt)
        unsettled = self.store.unsettled()
        for job in unsettled:
            try:
                if not self._hold(job.id):
                    continue
                if job.spec_schema != SPEC_SCHEMA_VERSION:
                    job = self._upgrade_spec(job)
                    if job is None:
                        continue
                self.advance(job)
            except StaleState:
                pass  # a user command moved it first; the next tick sees where it is now
            except LeaseLost as err:
                self._lost(job.id, err)
            except SpecSchemaError as err:  # of the current schema: damaged, it will not heal
                try:
                    self._give_up(job, f"its stored spec cannot be read: {err}")
                except Exception:
                    logger.exception("controller: giving up job %s in %s", job.id, job.status)
            except Exception:
                logger.exception("controller: job %s in %s", job.id, job.status)
        for job_id in self.work.keys() - {job.id for job in unsettled}:
            self.work.pop(job_id).future.cancel()  # cancelled meanwhile: a running step's result is dropped
        for job_id in self.leased - {job.id for job in unsettled}:
            self._release(job_id)  # settled: its run is over
        self.reconcile()

    def close(self) -> None:
        """A clean shutdown: the leases are given back, so another controller takes the jobs at once
        (a killed controller's leases expire instead)."""
        self.io.shutdown(wait=False, cancel_futures=True)
        for job_id in list(self.leased):
            try:
                self._release(job_id)
            except Exception:
                logger.exception("controller: releasing the lease on job %s", job_id)
        self.store.close()

    def _hold(self, job_id: str) -> bool:
        """Claim or renew this controller's lease on the job: True when it holds it. When another
        live controller does, this one stops acting on the job at once (its run, watched by the
        other now, is forgotten here, never stopped) and says so once."""
        lease = self.store.claim(job_id, self.id, self.host, self.pid, self.lease_s)
        if lease.holder != self.id and self._holder_died(lease):
            lease = self.store.claim(job_id, self.id, self.host, self.pid, self.lease_s, dead=lease.holder)
        if lease.holder == self.id:
            if self.others.pop(job_id, None) is not None:
                logger.warning("controller: took job %s over from controller %s", job_id, lease_name(lease))
            self.leased.add(job_id)
            return True
        self._forget(job_id)
        if self.others.get(job_id) != lease.holder:
            self.others[job_id] = lease.holder
            logger.warning(
                "controller: job %s is leased by controller %s until %.1f; leaving it to it",
                job_id,
                lease_name(lease),
                lease.expires_at,
            )
        return False

    def _forget(self, job_id: str) -> None:
        """Stop acting on a job another controller holds now: its run (watched by the other) is
        dropped here, never stopped, and a pending step's result is dropped too."""
        self.leased.discard(job_id)
        self.runs.pop(job_id, None)
        work = self.work.pop(job_id, None)
        if work is not None:
            work.future.cancel()

    def _lost(self, job_id: str, err: LeaseLost) -> None:
        """A write refused by the fence: the lease was lost between this tick's claim and the write
        (this controller stalled past it); the job is the new holder's."""
        logger.warning("controller: %s", err)
        self._forget(job_id)

    def _holds_now(self, job_id: str) -> bool:
        """Whether this controller's lease on the job is live now (read, not renewed)."""
        lease = self.store.lease(job_id)
        return lease is not None and lease.holder == self.id and lease.expires_at > time.time()

    def _holder_died(self, lease: Lease) -> bool:
        """Whether the lease's holder is a process of this host that is gone (a restarted actor's
        predecessor): its jobs need not wait for the lease to expire."""
        if lease.host != self.host or lease.pid == self.pid:
            return False
        try:
            os.kill(lease.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _stop_drivers(self, job_id: str, attempt: int) -> None:
        """Stop the job's drivers of `attempt` that run, without holding up the tick: the one this
        controller watches, and any other it can find (a Ray job by its derived id, a local process
        by its pid file)."""
        run = self.runs.pop(job_id, None)
        if run is not None and run.pid is not None:
            _stop_soon(run.pid)
        if self.ray_jobs is not None:
            phases: tuple[Phase, ...] = ("train", "eval")
            for phase in phases:
                try:
                    self.ray_jobs.stop(submission_id(job_id, attempt, phase))
                except Exception:  # the job server is down: the next tick tries again
                    logger.exception("controller: stopping job %s's %s driver", job_id, phase)
        threading.Thread(target=kill_drivers, args=(self.root, job_id, attempt), daemon=True).start()

    def _release(self, job_id: str) -> None:
        self.leased.discard(job_id)
        self.store.release(job_id, self.id)

    def _upgrade_spec(self, job: Job) -> Job | None:
        """The job with its spec in the current schema (dropped keys go in its history), or None
        when it cannot be read: left alone, and said once in the log, not at every tick."""
        if job.id in self.unreadable:
            return None
        try:
            return self.store.upgrade_spec(job.id)
        except SpecSchemaError as err:
            self.unreadable[job.id] = str(err)
            logger.error("controller: leaving job %s alone: %s", job.id, err)
            return None

    def _set_aside(self, row: UnreadableRow) -> None:
        """A row the store cannot read. A damaged one (`row.corrupt`) of an unsettled job goes to
        `error`, its driver stopped, so it is readable again and `jobs resume` restarts it from its
        checkpoint; any other (a newer clusterft's state or fields, a settled job) is left alone.
        Said once in the log, not at every tick."""
        if self.unreadable_rows.get(row.job_id) == row.error:
            return
        try:
            unsettled = JobState(row.state) not in SETTLED
        except ValueError:
            unsettled = False  # a state this clusterft does not know
        if row.corrupt and unsettled:
            if not self._hold(row.job_id):
                return  # another controller acts on it
            why = (
                f"the job store's record of this job could not be read ({row.error}; the damaged text is "
                f"in this event); `clusterft jobs resume {row.job_id}` starts it again from its newest "
                "valid checkpoint"
            )
            self._stop_drivers(row.job_id, row.attempt)
            if self.store.set_aside(row, why):
                logger.error("controller: job %s set aside in error: its row %s", row.job_id, row.error)
            return  # or it changed meanwhile: the next tick reads it again
        logger.error("controller: leaving job %s (%s) alone: its row %s", row.job_id, row.state, row.error)
        self.unreadable_rows[row.job_id] = row.error

    def _give_up(self, job: Job, why: str) -> None:
        """Move a job the controller cannot carry on to `error` (a training one through `failed`:
        the state machine records every training failure), stopping its driver if one runs."""
        self._stop_drivers(job.id, job.attempt)
        if job.status in (JobState.TRAINING, JobState.RESUMING):
            job = self.store.transition(job.id, job.status, Failed(why, retryable=False))
        self.store.transition(job.id, job.status, Errored(why))

    def _off_thread(self, job: Job, step: str, work: Callable[[], T]) -> Future[T] | None:
        """Run `work` (heavy I/O of `step` for `job`) in the I/O pool: None while it runs, then its
        finished future, once. The tick polls; it never waits for the work."""
        key = (step, job.updated_at)
        pending = self.work.get(job.id)
        if pending is None or pending.key != key:
            self.work[job.id] = _Work(key, self.io.submit(work))
            return None
        if not pending.future.done():
            return None
        del self.work[job.id]
        return pending.future

    def reconcile(self, now: float | None = None) -> None:
        """Move each registered, promoted or serving job to where the registry's aliases and the
        live serving records say it belongs (`decide_serving`), one transition at a time."""
        now = time.time() if now is None else now
        views: dict[str, tuple[dict[str, str | None], dict[str, AliasChange], frozenset[str]]] = {}
        for job in self.store.list(HOLDS_VERSION):
            try:
                for _ in HOLDS_VERSION:  # at most one move per state: registered → promoted → serving
                    assert isinstance(job.state, VersionState), job.state
                    name = job.state.model_name
                    if name not in views:
                        views[name] = self._registry_view(name, now)
                    new = decide_serving(job.state, *views[name])
                    if new is None or not self._hold(job.id):
                        break  # in place, or another controller's to move
                    job = self.store.transition(job.id, job.status, new)
            except StaleState:
                pass  # moved by someone else meanwhile; the next tick sees where it is now
            except LeaseLost as err:
                self._lost(job.id, err)
            except Exception:
                logger.exception("controller: reconciling job %s in %s", job.id, job.status)

    def _registry_view(
        self, model_name: str, now: float
    ) -> tuple[dict[str, str | None], dict[str, AliasChange], frozenset[str]]:
        """(aliases, each alias's latest move, versions live replicas serve) of one model."""
        last_moves = {change.alias: change for change in self.registry.alias_history(model_name)}
        served = live_versions(read_records(self.registry.root, model_name), now)
        return self.registry.aliases(model_name), last_moves, served

    # ------------------------------------------------------------ one step of one job

    def advance(self, job: Job) -> None:
        step = {
            JobState.SUBMITTED: self._start,
            JobState.TRAINING: self._watch_training,
            JobState.FAILED: self._decide,
            JobState.RESUMING: self._relaunch,
            JobState.EVALUATING: self._evaluate,
        }.get(job.status)
        if step is not None:
            step(job)

    def _start(self, job: Job) -> None:
        try:
            check_model_name(job.name)  # submit checks it; a job stored before it did is told here
            parse_gates(job_spec(job))
        except Exception as err:
            self.store.transition(job.id, JobState.SUBMITTED, Errored(f"{type(err).__name__}: {err}"))
            return
        self._launch_training(job, JobState.SUBMITTED)

    def _relaunch(self, job: Job) -> None:
        assert isinstance(job.state, Resuming)
        if time.time() >= job.updated_at + job.state.after_s:
            self._launch_training(job, JobState.RESUMING)

    def _launch_training(self, job: Job, expected: JobState) -> None:
        """Launch the training driver once the bundle it will start from (recorded as `resumed_from`)
        is known: the driver's own decision (`choose_start`: its own run's newest bundle, the spec's
        resume.from_checkpoint, or the newest run's), made here without its effects (deleting stale
        bundles, making a run folder) and off the tick (each candidate's sha256 is checked)."""
        chosen = self._off_thread(job, "resume point", lambda: start_point(job_spec(job)))
        if chosen is None:
            return
        try:
            resumed_from = chosen.result()
        except UserError as err:  # the driver refuses the run with this error, and the job records it
            logger.info("controller: job %s starts from no checkpoint: %s", job.id, err)
            resumed_from = None
        job = self.store.transition(job.id, expected, Training(resumed_from=resumed_from))
        self._launch(job, "train")

    def _launch(self, job: Job, phase: Phase) -> None:
        """Start the phase's driver: a Ray job when the cluster has a job server, whose submission id
        is the phase's log pointer; else a process of this host, logging to the run folder."""
        files = RunFiles.of(self.root, job.id, job.attempt, phase)
        if self.ray_jobs is not None:
            submission = self.ray_jobs.submit(files, job.id, job.attempt, self.store.location)
            self.runs[job.id] = _Run(files, None, None, submission)
            self.store.add_log(job.id, phase, pointer(submission))
            return
        process = launch(files, job.id, self.store.location, self.env)
        self.runs[job.id] = _Run(files, process, process.pid)
        self.store.add_log(job.id, phase, files.log)

    def _find_driver(self, job: Job, files: RunFiles) -> tuple[bool, str | None]:
        """(whether a driver of the phase runs, how it ended when known) for a driver this controller
        did not start (or lost track of): asked of the job server by its derived submission id, or
        found by its pid file on this host. A live one is re-attached (`self.runs`)."""
        if self.ray_jobs is not None:
            submission = submission_id(job.id, job.attempt, files.phase)
            state = self.ray_jobs.state(submission)
            if state is not None:
                if state.alive:
                    self.runs[job.id] = _Run(files, None, None, submission)
                    return True, None
                return False, f"(Ray job {submission}) {state.ended}"
        pid = files.read_pid()
        if pid is not None and pid_runs_job(pid, job.id):
            self.runs[job.id] = _Run(files, None, pid)  # outlived the previous controller
            return True, None
        return False, None

    def _poll(self, job: Job, phase: Phase) -> dict[str, Any] | Failure | None:
        """None while the phase's driver runs; then its result, or the Failure of its death."""
        files = RunFiles.of(self.root, job.id, job.attempt, phase)
        run = self.runs.get(job.id)
        code: int | None = None
        ended = None
        if run is not None and run.files == files and run.process is not None:
            code = run.process.poll()
            if code is None:
                return None
        else:
            alive, ended = self._find_driver(job, files)
            if alive:
                return None
        self.runs.pop(job.id, None)
        result = files.read_result()
        if result is None:
            how = ended or f"(pid {files.read_pid()}) {describe_exit(code)}"
            return Failure(f"the {phase} driver {how} without a result")
        return result

    def _launched(self, job: Job, files: RunFiles) -> bool:
        """Whether the phase's driver of this attempt was started (by this controller or another)."""
        if job.id in self.runs:
            return True
        if self.ray_jobs is not None and self.ray_jobs.state(submission_id(job.id, job.attempt, files.phase)):
            return True
        return files.read_pid() is not None

    def _watch_training(self, job: Job) -> None:
        outcome = self._poll(job, "train")
        if outcome is None:
            return
        facts: dict[str, Any] = {}
        if isinstance(outcome, dict):
            facts = {k: outcome.get(k) for k in TRAIN_FACTS}
            outcome = training_outcome(outcome)
        if isinstance(outcome, Complete):
            self.store.transition(
                job.id, JobState.TRAINING, Evaluating(completed_steps=outcome.steps), result={"train": facts}
            )
            return
        job = self.store.transition(
            job.id, JobState.TRAINING, Failed(why=outcome.reason, retryable=outcome.retryable)
        )
        self._decide(job)

    def _decide(self, job: Job) -> None:
        assert isinstance(job.state, Failed)
        failure = Failure(job.state.why, job.state.retryable)
        decision = decide_after_failure(job, failure, job_spec(job))
        if isinstance(decision, GiveUp):
            self.store.transition(job.id, JobState.FAILED, Errored(decision.reason))
        else:
            self.store.transition(
                job.id, JobState.FAILED, Resuming(after_s=decision.after_s, why=job.state.why)
            )

    # ------------------------------------------------------------ evaluate, register, promote

    def _evaluate(self, job: Job) -> None:
        """Evaluate and (promote.merge) merge in the eval driver, register off the tick, then decide
        and promote."""
        spec = job_spec(job)
        outcome: dict[str, Any] = {"metrics": {}}
        if spec.eval.enabled or spec.promote.merge:
            files = RunFiles.of(self.root, job.id, job.attempt, "eval")
            if not self._launched(job, files):
                self._launch(job, "eval")
                return
            polled = self._poll(job, "eval")
            if polled is None:
                return
            if isinstance(polled, Failure) or not polled["ok"]:
                why = polled.reason if isinstance(polled, Failure) else polled.get("error")
                stage = "evaluation" if not spec.promote.merge else "evaluation or merge check"
                # The weights are final: a crashed evaluation or a broken merge is not fixed by
                # training again.
                self.store.transition(job.id, JobState.EVALUATING, Errored(f"{stage} failed: {why}"))
                return
            outcome = polled
        metrics, merged = outcome["metrics"], outcome.get("merged")
        registered = self._off_thread(job, "register", lambda: self._register(job, spec, metrics, merged))
        if registered is None:
            return
        try:
            version = registered.result()
        except LeaseLost as err:
            self._lost(job.id, err)
            return
        except UserError as err:  # the registry refused it (its name, a missing base model): it stays so
            self.store.transition(job.id, JobState.EVALUATING, Errored(f"registration failed: {err}"))
            return
        register_and_promote(self.store, self.registry, job, spec, metrics, version)

    def _register(
        self, job: Job, spec: JobSpec, metrics: dict[str, Any], merged: dict[str, Any] | None
    ) -> Version:
        """The job's registry version, found or registered under the job's registration lock and
        this controller's live lease (checked under the lock: a controller that lost the job waits
        for the lock, then finds the lease gone, and registers nothing)."""
        with registering(self.root, job.id):
            if not self._holds_now(job.id):
                raise LeaseLost(job.id, self.id, self.store.lease(job.id))
            return find_or_register(self.registry, self.root, job, spec, metrics, merged)


def lease_name(lease: Lease) -> str:
    return f"{lease.holder[:8]} (pid {lease.pid} on {lease.host})"


def training_outcome(result: dict[str, Any]) -> Complete | Failure:
    """A driver's result as a policy input: a run that stopped short is a failure, never a success."""
    if not result["ok"]:
        return Failure(result.get("error") or "training failed", retryable=result.get("retryable", True))
    if not result.get("planned_steps"):
        return Failure("training reported no planned step count")
    return check_completion(result["planned_steps"], result["completed_steps"])


def start_point(spec: JobSpec) -> str | None:
    """The bundle a training driver of `spec` will start from (None: from scratch), as its
    `start_run` decides it (the spec's paths are absolute: `Jobs.submit` resolved them)."""
    from clusterft.train.checkpointing import choose_start
    from clusterft.train.launcher import locate
    from clusterft.train.recipe import resolve

    where = locate(spec)
    source = spec.resume.from_checkpoint
    return choose_start(spec, where.bundle_root, resolve(where.base_dir, source) if source else None).bundle


def _stop_soon(pid: int) -> None:
    """Stop a driver without holding up the tick (`kill` waits up to its grace period)."""
    threading.Thread(target=kill, args=(pid,), name=f"clusterft-kill-{pid}", daemon=True).start()
