"""One phase of a job in its own process: `run_phase`, started as
`python -m clusterft.cli.run_job {train,eval} --job ID --store DB --out DIR` (a store URL comes in
`$CLUSTERFT_STORE_URL` instead of --store).

The controller starts this (see `runs.py`); it reads the job's spec from the store, runs the phase
and writes `<phase>.result.json`. A crash, a SIGKILL or a lost node leaves no result file, which the
controller reads as a failure of the attempt.

    train  Ray Train run (`run_training`): resumes from the newest valid checkpoint of the same
           storage path and name, so a relaunched attempt continues where the last one stopped
    eval   `evaluate` on the job's eval set (eval.enabled), then, with promote.merge, merge the
           adapter into its base and run the merge-equivalence check (`stage_merged`): the heavy work
           before registration happens here, never in the controller's own loop
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Literal

from clusterft.config.spec import JobSpec
from clusterft.controller.policy import Failure
from clusterft.controller.runs import RunFiles
from clusterft.controller.stored_spec import job_spec
from clusterft.errors import UserError


def train(spec: JobSpec) -> dict[str, Any]:
    from clusterft.train.launcher import run_training

    summary = run_training(spec, show_progress=False)
    return {**dataclasses.asdict(summary), "ok": summary.ok, "retryable": True}


def eval_set(spec: JobSpec) -> list[Any]:
    """eval.dataset when set, else the job's own eval split (eval_dataset or val_size)."""
    from clusterft.controller.evaluate import load_eval_examples
    from clusterft.data import build_datasets
    from clusterft.hf.loading import load_tokenizer

    if spec.eval.dataset:
        return load_eval_examples(spec.eval.dataset, spec.data.dataset_dir, spec.eval.max_samples)
    tokenizer = load_tokenizer(spec.model.model_name_or_path, spec.model.trust_remote_code)
    examples = build_datasets(spec.data, tokenizer, seed=spec.train.seed).eval_examples
    return examples[: spec.eval.max_samples] if spec.eval.max_samples else examples


def eval_device(spec: JobSpec) -> Literal["cpu", "cuda"]:
    """The device the job trains on: cuda with cluster.gpus_per_worker > 0, else cpu."""
    if not spec.cluster.use_gpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"cluster.gpus_per_worker is {spec.cluster.gpus_per_worker:g}: the job trains on GPUs, so it "
            f"evaluates on CUDA, but torch sees no CUDA device in the eval process on {socket.gethostname()} "
            "(it runs where the controller runs); start the controller on a node with a GPU, or set "
            "eval.enabled: false"
        )
    return "cuda"


def evaluate_job(spec: JobSpec, run_dir: Path) -> dict[str, Any]:
    """{"ok", "metrics"} and, with promote.merge, {"merged": {"dir", "merge_check"}}: the merged
    model staged under `run_dir`, which the controller registers as a `merged` version. Evaluation
    runs on the job's device, per_device_eval_batch_size examples at a time."""
    from clusterft.controller.evaluate import ModelRef, evaluate

    output = Path(spec.train.output_dir)
    base = spec.model.model_name_or_path if spec.method.finetuning_type == "lora" else None
    result: dict[str, Any] = {"ok": True, "metrics": {}}
    if spec.eval.enabled:
        device = eval_device(spec)
        metrics = evaluate(
            ModelRef.resolve(output, base),
            eval_set(spec),
            template=spec.data.template,
            cutoff_len=spec.data.cutoff_len,
            max_new_tokens=spec.eval.max_new_tokens,
            metrics=spec.eval.metrics,
            batch_size=spec.train.per_device_eval_batch_size,
            device=device,
        )
        result["metrics"] = {k: v for k, v in metrics.items() if k != "samples"}
    if spec.promote.merge:  # the spec allows it only with LoRA, so `base` is set
        from clusterft.registry.merged import stage_merged

        merged_dir, report = stage_merged(output, spec.model.model_name_or_path, run_dir)
        result["merged"] = {"dir": str(merged_dir), "merge_check": report.to_dict()}
    return result


def run_phase(phase: str, job_id: str, store: str | Path, out: Path) -> int:
    """Run `phase` ("train" or "eval") of job `job_id` of the job store `store` (a SQLite file or a
    URL) and write its result file in `out`; the process's exit code (0 when the phase succeeded)."""
    from clusterft.controller.store import JobStore
    from clusterft.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    # Says where it runs: a Ray job's log is the only trace of which node ran an attempt.
    print(f"{phase} driver of job {job_id}: host {socket.gethostname()}, pid {os.getpid()}", file=sys.stderr)
    with JobStore(store) as opened:
        job = opened.get(job_id)
    files = RunFiles(out, phase)
    try:
        spec = job_spec(job)
        result = train(spec) if phase == "train" else evaluate_job(spec, out)
    except Exception as err:  # reported to the controller, which decides (UserError: not retryable)
        traceback.print_exc()
        failure = Failure.from_exception(err)
        result = {"ok": False, "error": failure.reason, "retryable": failure.retryable}
    files.write_result(result)
    print(f"{phase} result: ok={result['ok']}", file=sys.stderr)
    return 0 if result["ok"] else 1
