"""Run a job on Ray Train: connect (or start a local cluster), check, fit, export, summarise.

driver                                        workers (Ray Train, N processes)
------                                        --------------------------------
preflight: datasets, resume compatibility
TorchTrainer.fit()  (in a thread) ─────────▶  recipe.train_loop_per_worker
main thread: progress queue ◀──────────────── rank 0 puts start / step / checkpoint / end
  → progress bar, metrics.jsonl, callbacks
export the newest valid bundle → output_dir (peft adapter or HF model), loss.png, run_summary.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clusterft.config.spec import JobSpec
from clusterft.errors import UserError
from clusterft.storage import BundleStore
from clusterft.train.callbacks import CallbackRunner
from clusterft.train.checkpointing import RunStart
from clusterft.train.export import evaluate_loss, export_bundle, plot_loss
from clusterft.train.recipe import RunContext, resolve, train_loop_per_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunLocation:
    """Where a run's pieces live; all derived from the spec and the driver's working directory."""

    base_dir: str
    output_dir: Path
    storage_path: str  # Ray Train's storage_path (local dir or URI)
    name: str

    @property
    def bundle_root(self) -> str:
        return f"{self.storage_path}/{self.name}/bundles"

    @property
    def run_dir(self) -> Path:
        return self.output_dir / ".clusterft"


def locate(spec: JobSpec, base_dir: str | None = None) -> RunLocation:
    base = base_dir or os.getcwd()
    output = resolve(base, spec.train.output_dir)
    storage = spec.checkpoint.storage_path
    if storage is None:
        storage = str(output / "ckpt")
    elif "://" not in storage:
        storage = str(resolve(base, storage))
    return RunLocation(base, output, storage, spec.checkpoint.name or output.name)


@dataclass
class RunSummary:
    """What run_summary.json holds; `ok` is False when fewer steps than planned were completed."""

    status: str
    planned_steps: int | None
    completed_steps: int
    final_loss: float | None
    restarts: int
    resumed_from: list[str]
    wall_time_s: float
    output: str | None
    checkpoint: str | None
    error: str | None = None
    eval_metrics: dict[str, float] | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


def run_training(spec: JobSpec, *, base_dir: str | None = None, show_progress: bool = True) -> RunSummary:
    """Train `spec` to completion on Ray Train; write outputs; return the summary (never raises for a
    training failure: the summary says `failed`). User mistakes found before start raise UserError."""
    import ray

    started = time.time()
    where = locate(spec, base_dir)
    start = preflight(spec, where)
    where.run_dir.mkdir(parents=True, exist_ok=True)
    (where.run_dir / SPEC_MARKER).write_text(spec.spec_hash())  # this job's output_dir from now on
    owns_ray = _connect(spec)
    try:
        return _fit(spec, where, start, started, show_progress)
    finally:
        if owns_ray:
            ray.shutdown()


def preflight(spec: JobSpec, where: RunLocation) -> RunStart:
    """Fail fast, before any worker starts, on what would fail in every worker (and every restart);
    return where the run writes its bundles and which bundle it starts from."""
    from clusterft.data import build_datasets, run_cache_dir
    from clusterft.hf.loading import check_model_dir, load_tokenizer
    from clusterft.train.checkpointing import bundle_at, load_bundle, start_run

    model_dir = check_model_dir(resolve(where.base_dir, spec.model.model_name_or_path))
    tokenizer = load_tokenizer(model_dir, spec.model.trust_remote_code)
    source = spec.resume.from_checkpoint
    start = start_run(spec, where.bundle_root, resolve(where.base_dir, source) if source else None)
    if start.bundle is None:
        check_output_dir(spec, where)  # before the data cache below writes into output_dir
    # The one tokenization of the run: the workers memory-map this cache (data.cache_dir wins).
    train = build_datasets(
        spec.data, tokenizer, seed=spec.train.seed, base_dir=where.base_dir,
        default_cache_dir=run_cache_dir(where.run_dir),
    ).train  # fmt: skip
    if start.bundle is None:
        return start
    store, name = bundle_at(start.bundle)  # start_run verified it
    from clusterft.hf.loading import load_model
    from clusterft.hf.lora import lora_target_modules
    from clusterft.train.plan import check_resumable, compat_record

    targets = lora_target_modules(load_model(model_dir), spec.method.lora_target)
    trainer = load_bundle(store, name, rank=0).trainer
    weights_only = spec.resume.weights_only and trainer["spec_hash"] != spec.spec_hash()
    current = compat_record(spec, model_dir, train, targets)
    check_resumable(trainer["compat"], current, weights_only, name)
    return start


SPEC_MARKER = "spec_hash"  # in the run dir: which job spec writes this output_dir


def check_output_dir(spec: JobSpec, where: RunLocation) -> None:
    """A run starting from scratch writes into an empty output_dir, or its own (an earlier attempt of
    the same spec), unless overwrite_output_dir says to write over what is there: LLaMA-Factory's and
    HF Trainer's rule, so a new job never mixes its export with another run's files."""
    out = where.output_dir
    if spec.train.overwrite_output_dir or not out.is_dir():
        return
    marker = where.run_dir / SPEC_MARKER
    if marker.is_file() and marker.read_text().strip() == spec.spec_hash():
        return
    own = {where.run_dir.resolve()}
    if "://" not in where.storage_path:
        own.add(Path(where.storage_path).resolve())
    others = sorted(p.name for p in out.iterdir() if p.resolve() not in own)
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise UserError(
            f"output_dir {out} already holds another run's files ({shown}) and this run starts from "
            "scratch: set overwrite_output_dir: true to write over them, use another output_dir, or "
            "continue that run's checkpoints with resume (weights_only: true after changing the spec)"
        )


def _connect(spec: JobSpec) -> bool:
    """Use the running Ray, or RAY_ADDRESS / cluster.address, or start a local cluster (returns True)."""
    import ray

    if ray.is_initialized():
        return False
    address = spec.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    cpus = max(1, math.ceil(spec.cluster.max_workers * max(spec.cluster.cpus_per_worker, 1)))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    return True


def _fit(
    spec: JobSpec, where: RunLocation, start: RunStart, started: float, show_progress: bool
) -> RunSummary:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = spec.cluster
    # On the driver's node, as Ray Train's own controller: a queue on a worker node would die with
    # that node and take the run's progress reporting with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    context = RunContext(
        bundle_root=start.bundle_root,
        base_dir=where.base_dir,
        run_dir=str(where.run_dir),
        start_from=start.bundle,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "run": asdict(context),
            "progress": progress,
        },
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,  # (min, max): Ray Train's elastic scaling
            use_gpu=cluster.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cluster.elastic_resize_interval_s,
        ),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        run_config=RunConfig(
            name=where.name,
            storage_path=where.storage_path,
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_last),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as err:  # TrainingFailedError after max_failures: reported in the summary
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="clusterft-fit", daemon=True)
    tracker = ProgressTracker(where.output_dir, CallbackRunner.for_run(spec, where.output_dir), show_progress)
    with _elastic_start_timeout(cluster.elastic):  # read by fit() as it creates its controller
        thread.start()
        while thread.is_alive():
            tracker.drain(progress, timeout=0.2)
    tracker.drain(progress, timeout=0)
    tracker.close()
    return _finish(spec, where, BundleStore(start.bundle_root), tracker, started, outcome.get("error"))


# Ray Train reads this in the driver when fit() creates its controller, and passes it on to it.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Elastic: how long a worker group sized from Ray's view of free resources waits for them before Ray
# Train decides its size again (its default is 60 s). That view still counts a lost node until the
# autoscaling coordinator's next tick (20 s) after the GCS marks it dead, so a shrink after a node
# loss first tried the old size and waited the whole 60 s (tests/train/test_node_loss.py); a retry is
# cheap (a controller error, not one of max_failures), so it is short. Your own value of the env wins.
ELASTIC_START_TIMEOUT_S = "10"


@contextlib.contextmanager
def _elastic_start_timeout(elastic: bool) -> Iterator[None]:
    """Sets START_TIMEOUT_ENV to ELASTIC_START_TIMEOUT_S during an elastic run unless it is set
    already; restores the environment after (a test process runs many jobs)."""
    if not elastic or START_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[START_TIMEOUT_ENV] = ELASTIC_START_TIMEOUT_S
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_ENV, None)


def _finish(
    spec: JobSpec,
    where: RunLocation,
    store: BundleStore,
    tracker: ProgressTracker,
    started: float,
    error: Exception | None,
) -> RunSummary:
    """Export this run's newest valid bundle, plot, and write run_summary.json."""
    latest = store.find_latest_valid()
    completed = int(latest.meta.get("global_step", 0)) if latest else 0
    planned = tracker.planned_steps
    output = None
    if latest is not None and error is None:
        output = str(export_bundle(spec, where.base_dir, store, latest.name, where.output_dir))
    if spec.train.plot_loss:
        plot_loss(where.output_dir / "metrics.jsonl", where.output_dir / "loss.png")
    status, error_text = run_status(error, planned, completed)
    eval_metrics = None
    if output is not None and spec.train.do_eval:
        eval_metrics = evaluate_loss(spec, where.base_dir, where.output_dir)
        if eval_metrics is not None:
            tracker.callbacks.call("on_eval", eval_metrics)
    summary = RunSummary(
        status=status,
        planned_steps=planned,
        completed_steps=completed,
        final_loss=latest.meta.get("loss") if latest else None,
        restarts=max(0, tracker.starts - 1),
        resumed_from=tracker.resumed_from,
        wall_time_s=round(time.time() - started, 3),
        output=output,
        checkpoint=store.location(latest.name) if latest else None,
        error=error_text,
        eval_metrics=eval_metrics,
        checkpoints=tracker.checkpoints,
    )
    (where.output_dir / "run_summary.json").write_text(json.dumps(asdict(summary), indent=2))
    tracker.callbacks.call("on_train_end", asdict(summary))
    return summary


def run_status(error: Exception | None, planned: int | None, completed: int) -> tuple[str, str | None]:
    """("succeeded" | "failed", why): ending with fewer steps than planned is a failure, not a success."""
    if error is not None:
        return "failed", f"{type(error).__name__}: {error}"
    if planned is None or completed < planned:
        return "failed", f"completed {completed} of {planned} planned steps"
    return "succeeded", None


class ProgressTracker:
    """Consumes the workers' progress events: progress bar, metrics.jsonl, callbacks, summary facts."""

    def __init__(self, output_dir: Path, callbacks: CallbackRunner, show: bool):
        path = output_dir / "metrics.jsonl"
        self.metrics_file = open(path, "a+b")  # noqa: SIM115
        if self.metrics_file.tell():  # a killed attempt may have cut its last line: end it first
            self.metrics_file.seek(-1, os.SEEK_END)
            if self.metrics_file.read(1) != b"\n":
                self.metrics_file.write(b"\n")
        self.callbacks, self.show = callbacks, show
        self.bar: Any = None
        self.planned_steps: int | None = None
        self.starts = 0
        self.resumed_from: list[str] = []
        self.checkpoints: list[dict[str, Any]] = []

    def drain(self, queue: Any, timeout: float) -> None:
        from ray.util.queue import Empty

        try:
            events = [queue.get(timeout=timeout)] if timeout else []
            events += queue.get_nowait_batch(queue.qsize())
        except Empty:
            return
        for event in events:
            getattr(self, f"_on_{event.pop('event')}")(event)

    def _on_start(self, event: dict[str, Any]) -> None:
        self.starts += 1
        self.planned_steps = event["planned_steps"]
        if event["resumed_from"]:
            self.resumed_from.append(event["resumed_from"])
        if self.show:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=self.planned_steps, desc="train", unit="step", dynamic_ncols=True)
            self.bar.n = event["start_step"]
            self.bar.refresh()

    def _on_step(self, event: dict[str, Any]) -> None:
        record = {**event, "attempt": self.starts}
        self.metrics_file.write((json.dumps(record) + "\n").encode())
        self.metrics_file.flush()
        if self.bar is not None:
            self.bar.n = event["step"]
            self.bar.set_postfix(
                loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}", tok_s=f"{event['tokens_per_s']:.0f}"
            )
        self.callbacks.call("on_step_end", record)

    def _on_checkpoint(self, event: dict[str, Any]) -> None:
        self.checkpoints.append(event)
        self.callbacks.call("on_checkpoint", event)

    def _on_end(self, event: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = event["step"]
            self.bar.refresh()

    def close(self) -> None:
        self.metrics_file.close()
        if self.bar is not None:
            self.bar.close()
