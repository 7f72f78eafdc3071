"""Pure decisions about a run: how many steps, which batch shapes, whether a checkpoint fits the spec.

Both the driver (to validate before any worker starts, and to size the progress bar) and every
worker (to run) compute the same plan from the same inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterft.config.spec import JobSpec
from clusterft.errors import UserError
from clusterft.hf.loading import model_fingerprint


@dataclass(frozen=True)
class RunPlan:
    """Batch geometry and length of a run on a given number of workers."""

    world_size: int
    data_parallel_size: int
    micro_batch_size: int  # per data-parallel rank
    global_micro_batch: int  # examples per micro-step, all ranks together (fixed for the whole run)
    gradient_accumulation_steps: int
    micro_steps_per_epoch: int
    total_steps: int

    def position(self, global_step: int, micro: int = 0) -> tuple[int, int]:
        """(epoch, micro-step within epoch) of micro-batch `micro` of optimizer step `global_step`."""
        return divmod(global_step * self.gradient_accumulation_steps + micro, self.micro_steps_per_epoch)


def data_parallel_size(spec: JobSpec, world_size: int) -> int:
    """Workers that hold different data: the world divided by the model-parallel degree."""
    if spec.parallel.strategy == "pipeline":
        return world_size // spec.parallel.pipeline_stages
    if spec.parallel.strategy == "tensor":
        return world_size // spec.parallel.tensor_parallel_size
    return world_size


def plan_run(
    spec: JobSpec, world_size: int, num_train_examples: int, global_micro_batch: int | None = None
) -> RunPlan:
    """The plan for `world_size` workers.

    `global_micro_batch` is the run's examples per micro-step as first started (stored in its
    checkpoints). Keeping it fixed when a run resumes on a different number of workers keeps the
    data order and the optimisation identical: M workers each take G/M examples instead of G/N
    (the micro-batch per worker adapts, gradient accumulation does not: each optimizer step sees
    the same micro-steps, each the same examples, weighted the same). An elastic job's G is that of
    its full size (max workers) even when it starts on fewer.
    """
    dp = data_parallel_size(spec, world_size)
    full_dp = data_parallel_size(spec, spec.cluster.max_workers) if spec.cluster.elastic else dp
    global_micro = global_micro_batch or spec.train.per_device_train_batch_size * full_dp
    if global_micro % dp:
        raise UserError(
            f"this run's global micro-batch of {global_micro} examples cannot be split evenly over "
            f"{dp} data-parallel workers; resume on a number of workers that divides it"
        )
    micro_steps = num_train_examples // global_micro
    if micro_steps == 0:
        raise UserError(
            f"{num_train_examples} training examples cannot fill one micro-step of {global_micro} "
            "(per_device_train_batch_size × workers); lower the batch size or add data"
        )
    accumulation = spec.train.gradient_accumulation_steps
    if spec.train.max_steps > 0:
        total = spec.train.max_steps
    else:
        total = max(1, int(spec.train.num_train_epochs * micro_steps) // accumulation)
    return RunPlan(world_size, dp, global_micro // dp, global_micro, accumulation, micro_steps, total)


def warmup_steps(spec: JobSpec, total_steps: int) -> int:
    return spec.train.warmup_steps or int(spec.train.warmup_ratio * total_steps)


def data_fingerprint(train: list[Any]) -> str:
    """sha256 over the encoded training examples (token ids and labels), in order."""
    digest = hashlib.sha256()
    for example in train:
        digest.update(repr((example.input_ids, example.labels)).encode())
    return digest.hexdigest()[:16]


# Train settings an exact resume takes from the checkpoint (optimizer state, LR schedule, batch
# geometry): a changed value would be silently ignored, so resuming refuses it instead.
RESUMED_SETTINGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)


def resumed_settings(spec: JobSpec) -> dict[str, Any]:
    return {key: getattr(spec.train, key) for key in RESUMED_SETTINGS}


def compat_record(
    spec: JobSpec, model_dir: Path, train: list[Any], lora_targets: list[str]
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the model, the method's shapes, the data, and
    the optimisation settings an exact resume restores from it."""
    method = spec.method
    record: dict[str, Any] = {
        "model": model_fingerprint(model_dir),
        "finetuning_type": method.finetuning_type,
        "data": data_fingerprint(train),
        "train": resumed_settings(spec),
    }
    if method.finetuning_type == "lora":
        record.update(lora_rank=method.lora_rank, lora_target=sorted(lora_targets))
    if method.finetuning_type == "freeze":
        record["freeze_trainable_layers"] = method.freeze_trainable_layers
    return record


def check_resumable(saved: dict[str, Any], current: dict[str, Any], weights_only: bool, bundle: str) -> None:
    """Refuse a checkpoint that does not fit this run, naming each difference and the way out."""
    keys = ("finetuning_type", "lora_rank", "lora_target", "freeze_trainable_layers")
    if not weights_only:
        keys += ("model", "data")
    problems = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]
    if not weights_only:  # checkpoints written before the record had "train" resume as before
        saved_train, current_train = saved.get("train", {}), current.get("train", {})
        problems += [
            f"{key}: checkpoint has {saved_train[key]!r}, this run {current_train.get(key)!r} "
            "(an exact resume restores the checkpoint's optimizer and schedule, so the new value "
            "would be ignored)"
            for key in RESUMED_SETTINGS
            if key in saved_train and saved_train[key] != current_train.get(key)
        ]
    if problems:
        hint = (
            "start a new run (another output_dir or checkpoint.name)"
            if weights_only
            else "set the value back, set resume: {weights_only: true} to keep only the weights and "
            "start a new schedule, or start a new run"
        )
        raise UserError(
            f"checkpoint {bundle} does not fit this job:\n  " + "\n  ".join(problems) + f"\n{hint}"
        )
