"""A trained and evaluated job into the registry: the files of output_dir that are the model (not
the run's own metrics, plots and checkpoints), the version holding them (found again rather than
registered twice when a controller restarted mid-way; this part runs in the controller's I/O pool:
it reads and copies every file of the model), then the promotion the gates decide, moving the alias
in the same compare-and-set as the job's move to registered."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clusterft.config.spec import JobSpec
from clusterft.controller.policy import Promote, decide_promotion, parse_gates
from clusterft.controller.state import Job, JobState, Registered
from clusterft.controller.store import JobStore
from clusterft.registry.registry import Registry, Version

RUN_FILES = frozenset({"metrics.jsonl", "loss.png", "run_summary.json"})
"""Files of output_dir that describe the run rather than the model; not registered."""


@contextmanager
def registering(root: Path, job_id: str) -> Iterator[None]:
    """Hold the job's registration lock (an flock under the controllers' shared `root`; on Linux it
    holds across hosts over NFS too): two controllers that both reach a job's registration take
    turns, and the second finds the first's version instead of registering a duplicate."""
    lock_dir = root / "runs" / job_id
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "register.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find_or_register(
    registry: Registry,
    root: Path,
    job: Job,
    spec: JobSpec,
    metrics: dict[str, Any],
    merged: dict[str, Any] | None,
) -> Version:
    """The job's version: the one a controller restarted mid-way registered already (same job and
    checkpoint; verified), or a new one, copied from the links `model_files` stages under `root`.
    `merged` is the eval driver's staged merge (promote.merge): registered as a `merged` version
    with its passing merge check."""
    name = job.name
    checkpoint = (job.result.get("train") or {}).get("checkpoint")
    for version in registry.versions(name):
        if version.manifest.job_id == job.id and version.manifest.checkpoint == checkpoint:
            return registry.verify(name, version.version)
    lora = spec.method.finetuning_type == "lora"
    kind = "merged" if merged else "adapter" if lora else "full"
    return registry.register(
        name,
        Path(merged["dir"]) if merged else model_files(root, job, spec),
        kind=kind,
        base_model=spec.model.model_name_or_path if lora else None,
        job_id=job.id,
        checkpoint=checkpoint,
        eval_results=metrics,
        merge_check=merged["merge_check"] if merged else None,
    )


def model_files(root: Path, job: Job, spec: JobSpec) -> Path:
    """The exported adapter or model of output_dir, without the run's own files (metrics, plots,
    checkpoints), as a directory of links (under the controller's `root`) for the registry to copy
    from."""
    output = Path(spec.train.output_dir)
    staged = root / "runs" / job.id / "model"
    if staged.exists():
        for link in staged.iterdir():
            link.unlink()
    staged.mkdir(parents=True, exist_ok=True)
    for path in sorted(output.iterdir()):
        if path.is_file() and path.name not in RUN_FILES:
            (staged / path.name).symlink_to(path.resolve())
    return staged


def register_and_promote(
    store: JobStore, registry: Registry, job: Job, spec: JobSpec, metrics: dict[str, Any], version: Version
) -> None:
    """Move the evaluating job to registered and, when the gates (or promote.auto) say so, move the
    alias in the same compare-and-set: a job cancelled meanwhile never has its version promoted. A
    crash between the alias move and the commit leaves the job evaluating, and the controller's next
    tick does both again (the version is found, the move is a no-op)."""
    name, alias = job.name, spec.promote.alias
    production = registry.aliases(name).get("production")
    production_eval = dict(registry.show(name, production).manifest.eval) if production else None
    decision = decide_promotion(
        metrics,
        parse_gates(spec),
        production_eval,
        spec.promote.not_worse_than_production,
        auto=spec.promote.auto,
    )
    result = {"eval": metrics, "model_name": name, "version": version.version}
    if not isinstance(decision, Promote):
        why = (
            f"{decision.reason}; to promote it anyway: "
            f"`clusterft registry promote {name} {version.version} --alias {alias}`"
        )
        store.transition(
            job.id, JobState.EVALUATING, Registered(name, version.version, why=why), result=result
        )
        return
    # The reconcile pass that follows moves the job to promoted (and serving), and the job that held
    # the alias before back to registered: the same path as a `registry promote`. The files were
    # hashed as they were copied in (or verified when found): no second read here.
    registered = Registered(name, version.version)
    with store.moving(job.id, JobState.EVALUATING, registered, result=result):
        registry.promote(name, version.version, alias, verify=False)
