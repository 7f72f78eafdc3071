"""The jobs operations the CLI and the REST API share: submit, list, status, logs, cancel, resume.

They act on the job store directly (it is the truth); the controller actor reconciles, and is
poked (`wake`) when one is reachable so it acts at once rather than at its next poll.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clusterft.config.spec import JobSpec
from clusterft.controller.ray_jobs import RayJobs, client_job_server, pointed_submission
from clusterft.controller.runs import kill_drivers
from clusterft.controller.state import Cancelled, Job, JobState, Resuming
from clusterft.controller.store import JobStore, StaleState
from clusterft.controller.store_backend import store_location
from clusterft.errors import UserError

logger = logging.getLogger(__name__)
ROOT_ENV = "CLUSTERFT_HOME"
DEFAULT_ROOT = "saves/controller"


def absolute_spec(spec: JobSpec, base_dir: str | Path) -> JobSpec:
    """The spec with its paths made absolute against the submitter's directory: the controller and
    its drivers run elsewhere (another cwd, another node on the same shared storage)."""
    base = Path(base_dir).resolve()

    def path(value: str | None, must_exist: bool = False) -> str | None:
        if value is None or "://" in value or Path(value).is_absolute():
            return value
        candidate = base / value
        return str(candidate) if candidate.exists() or not must_exist else value

    model, data, train = spec.model, spec.data, spec.train
    return spec.model_copy(
        update={
            "model": model.model_copy(
                update={
                    "model_name_or_path": path(model.model_name_or_path, must_exist=True),
                    "adapter_name_or_path": path(model.adapter_name_or_path, must_exist=True),
                }
            ),
            "data": data.model_copy(update={"dataset_dir": path(data.dataset_dir)}),
            "train": train.model_copy(update={"output_dir": path(train.output_dir)}),
            "checkpoint": spec.checkpoint.model_copy(
                update={"storage_path": path(spec.checkpoint.storage_path)}
            ),
            "resume": spec.resume.model_copy(update={"from_checkpoint": path(spec.resume.from_checkpoint)}),
            "parallel": spec.parallel.model_copy(update={"deepspeed": path(spec.parallel.deepspeed)}),
        }
    )


def job_record(job: Job, store: JobStore | None = None) -> dict[str, Any]:
    """A job as JSON (for `jobs status --json` and the REST API), with progress and history."""
    record: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "status": str(job.status),
        "reason": job.reason,
        "state": job.state.data(),
        "attempt": job.attempt,
        "restarts": job.restarts,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "resumed_from": job.resumed_from,
        "spec_schema": job.spec_schema,
        "result": dict(job.result),
        "progress": progress(job),
    }
    if store is not None:
        record["events"] = [
            {**asdict(e), "from_state": e.from_state and str(e.from_state), "to_state": str(e.to_state)}
            for e in store.events(job.id)
        ]
        record["logs"] = [asdict(log) for log in store.logs(job.id)]
    return record


def progress(job: Job) -> dict[str, Any]:
    """Steps done (the last step in output_dir/metrics.jsonl) of the planned total."""
    from clusterft.controller.stored_spec import job_spec
    from clusterft.train.export import read_metrics

    spec = job_spec(job)
    steps = read_metrics(Path(spec.train.output_dir) / "metrics.jsonl")
    planned = (job.result.get("train") or {}).get("planned_steps") or (
        spec.train.max_steps if spec.train.max_steps > 0 else None
    )
    last = max(steps) if steps else 0
    return {"step": last, "planned_steps": planned, "loss": steps[last].get("loss") if steps else None}


def run_folders(spec: JobSpec) -> dict[str, str]:
    """The folders a job's run writes, by the spec keys that choose them: two unsettled jobs
    writing one of them would overwrite each other's checkpoints, exports and metrics."""
    from clusterft.train.launcher import locate

    where = locate(spec)
    return {
        "train.output_dir": str(where.output_dir),
        "checkpoint.storage_path/name": f"{where.storage_path}/{where.name}",
    }


class Jobs:
    """The operations, over one controller root (run files, and the job store unless `store_url`
    names another: a postgresql:// URL) and registry."""

    def __init__(
        self,
        root: str | Path,
        registry_root: str | Path,
        *,
        controller: Any = None,
        store_url: str | None = None,
    ):
        self.root = Path(root).resolve()
        self.registry_root = Path(registry_root).resolve()
        self.store = JobStore(store_location(self.root, store_url))
        self.controller = controller
        """The controller actor handle to wake, or None (it polls the store anyway)."""
        self._job_server: RayJobs | None = None

    def close(self) -> None:
        self.store.close()

    def _wake(self) -> None:
        if self.controller is not None:
            self.controller.wake.remote()

    def submit(
        self,
        spec: JobSpec,
        base_dir: str | Path | None = None,
        name: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Job:
        """Record the job (paths made absolute) and return it at once; the controller starts it.
        Refused (`FolderInUse`) while an unsettled job writes its output or checkpoint folder; with
        `idempotency_key`, a retried submission returns the job the first one made."""
        from clusterft.controller.policy import parse_gates

        parse_gates(spec)  # a bad gate is the user's mistake: say so now, not after training
        spec = absolute_spec(spec, base_dir or os.getcwd())
        job = self.store.submit(spec, name=name, idempotency_key=idempotency_key, folders=run_folders(spec))
        self._wake()
        return job

    def list(self, limit: int | None = None) -> list[Job]:
        return self.store.list(limit=limit)

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished evaluating; its running driver is killed."""
        for _ in range(5):
            job = self.store.get(job_id)
            try:
                job = self.store.transition(job_id, job.status, Cancelled())
                break
            except StaleState:
                continue  # the controller moved it meanwhile; try from where it is now
        else:
            raise UserError(f"job {job_id} keeps changing state; try again")
        # Kill here too: the driver runs on this host when the controller does (or no controller runs).
        kill_drivers(self.root, job_id, job.attempt)
        self._stop_ray_drivers(job)
        self._wake()
        return job

    def _stop_ray_drivers(self, job: Job) -> None:
        """Stop the job's drivers of its attempt that run as Ray jobs, when the job server is
        reachable from here; otherwise the controller holding the job stops them at its next tick."""
        for log in self.store.logs(job.id):
            submission = pointed_submission(log.path)
            if submission is None or log.attempt != job.attempt:
                continue
            try:
                self._ray_jobs().stop(submission)
            except (UserError, RuntimeError, ConnectionError) as err:
                logger.warning("jobs: %s: the controller stops %s instead", err, submission)

    def resume(self, job_id: str) -> Job:
        """Relaunch a cancelled or failed (error) job from its newest valid checkpoint; refused
        (`FolderInUse`) while another unsettled job writes its folders."""
        job = self.store.get(job_id)
        if job.status not in (JobState.CANCELLED, JobState.ERROR):
            raise UserError(f"job {job_id} is {job.status}; only cancelled or error jobs can be resumed")
        job = self.store.transition(job_id, job.status, Resuming(after_s=0.0, why="resumed by the user"))
        self._wake()
        return job

    def log_paths(self, job_id: str) -> list[Path]:
        return [Path(log.path) for log in self.store.logs(job_id)]

    def log_texts(self, job_id: str) -> list[tuple[str, str | None]]:
        """(where, text) of each of the job's logs in the order their phases ran: a file's text, or a
        Ray job driver's output as the cluster's job server keeps it (any host can read it); None
        for a file not written yet."""
        texts: list[tuple[str, str | None]] = []
        for log in self.store.logs(job_id):
            submission = pointed_submission(log.path)
            if submission is not None:
                texts.append((log.path, self._ray_jobs().logs(submission)))
                continue
            path = Path(log.path)
            texts.append((log.path, path.read_text(errors="replace") if path.is_file() else None))
        return texts

    def _ray_jobs(self) -> RayJobs:
        """The job server this client reaches (`client_job_server`), opened once."""
        if self._job_server is None:
            self._job_server = RayJobs(client_job_server())
        return self._job_server

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None, bar: bool = True) -> Job:
        """Follow the job until its run is over (settled: registered, promoted, serving, cancelled or
        error), with a progress bar of training steps."""
        from tqdm import tqdm

        deadline = None if timeout_s is None else time.time() + timeout_s
        progress_bar = None
        while True:
            job = self.store.get(job_id)
            if bar:
                done = progress(job)
                if progress_bar is None:
                    progress_bar = tqdm(
                        total=done["planned_steps"], desc=job_id, unit="step", dynamic_ncols=True
                    )
                progress_bar.n = done["step"]
                progress_bar.set_postfix_str(str(job.status))
            if job.settled:
                break
            if deadline is not None and time.time() > deadline:
                break
            time.sleep(poll_s)
        if progress_bar is not None:
            progress_bar.close()
        return job
