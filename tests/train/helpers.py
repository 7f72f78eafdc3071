"""Helpers for the Ray training tests: tiny job specs, killing a worker by pid, reading bundles."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from clusterft.config import JobSpec, parse_job_dict
from clusterft.storage import BundleStore
from clusterft.train.checkpointing import bundle_weights, load_bundle
from clusterft.train.launcher import locate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
# The data-parallel strategies, as `parallel` sections of a job.
DATA_PARALLEL = {
    "ddp": {"strategy": "ddp"},
    "zero1": {"strategy": "zero1"},
    "zero2": {"strategy": "zero2"},
    "zero3": {"strategy": "zero3"},
    "zero3_offload": {"strategy": "zero3", "offload": "optimizer+params"},
}


def make_job(model_dir: Path, out: Path, **overrides: Any) -> JobSpec:
    """A 8-step LoRA job on 2 workers over 64 demo examples (seconds per run on 2 cores)."""
    raw: dict[str, Any] = {
        "model_name_or_path": str(model_dir),
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_dropout": 0.1,  # exercises the RNG restore of exact resume
        "dataset": "demo_tasks",
        "dataset_dir": str(EXAMPLES),
        "template": "chatml",
        "cutoff_len": 48,
        "max_samples": 64,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "max_steps": 8,
        "warmup_steps": 2,
        "lr_scheduler_type": "cosine",
        "save_steps": 2,
        "output_dir": str(out),
        "cluster": {"num_workers": 2},
        "parallel": {"strategy": "ddp"},
        "checkpoint": {"keep_last": 3},
        "failure": {"max_failures": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return parse_job_dict(raw, "test")


def bundles(spec: JobSpec) -> BundleStore:
    return BundleStore(locate(spec).bundle_root)


def final_weights(spec: JobSpec) -> dict:
    store = bundles(spec)
    return bundle_weights(load_bundle(store, store.find_latest_valid().name, rank=0))


class RecordingCallback:
    """A user callback (named by dotted path in a spec) that records the hooks the driver calls."""

    events: ClassVar[list[tuple[str, dict]]] = []

    def on_step_end(self, metrics: dict) -> None:
        self.events.append(("on_step_end", metrics))

    def on_checkpoint(self, info: dict) -> None:
        self.events.append(("on_checkpoint", info))

    def on_eval(self, metrics: dict) -> None:
        self.events.append(("on_eval", metrics))

    def on_train_end(self, summary: dict) -> None:
        self.events.append(("on_train_end", summary))


class WorkerKiller(threading.Thread):
    """SIGKILLs training worker `rank` as soon as a bundle of step >= `after_step` is published;
    then (optionally) truncates a file of the newest bundle, as a crash mid-write would."""

    def __init__(self, spec: JobSpec, after_step: int, rank: int = 1, corrupt_newest: bool = False):
        super().__init__(daemon=True)
        self.spec, self.after_step, self.rank, self.corrupt = spec, after_step, rank, corrupt_newest
        self.killed_pid: int | None = None
        self.killed_at: float | None = None
        self.corrupted: str | None = None

    def run(self) -> None:
        store, pid_file = bundles(self.spec), locate(self.spec).run_dir / "workers" / f"rank-{self.rank}.pid"
        deadline = time.time() + 240
        while time.time() < deadline:
            steps = [info.step for info in store.list(verify=False)]
            if steps and max(steps) >= self.after_step and pid_file.exists():
                self.killed_pid = int(pid_file.read_text())
                os.kill(self.killed_pid, signal.SIGKILL)
                self.killed_at = time.time()
                break
            time.sleep(0.01)
        if self.corrupt and self.killed_pid:
            time.sleep(0.3)  # let a publish that was already past its barrier finish
            newest = store.list(verify=False)[-1].name
            root = store.storage.local_path(newest)
            target = root / "state" / "rank-0.pt"
            target.write_bytes(target.read_bytes()[:100])
            self.corrupted = newest
