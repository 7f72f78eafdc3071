"""Compile the spec's one parallelism word into a DeepSpeed config dict. Pure: no I/O, no hardware probes.

    strategy   zero stage   what is partitioned across data-parallel ranks
    ddp        0            nothing (gradients all-reduced)
    zero1      1            optimizer state
    zero2      2            optimizer state + gradients
    zero3      3            optimizer state + gradients + parameters
    pipeline   0 or 1       layers cut into stages; ZeRO-1 at most (DeepSpeed refuses 2/3 with pipeline)
    tensor     0            linear layers split by AutoTP (`tensor_parallel.autotp_size`)

On CPU the optimizer is DeepSpeed's `AdamW` with `torch_adam: true` (torch.optim.AdamW underneath): it
needs no compiled op and works with every ZeRO stage and with CPU offload. On GPU DeepSpeed's fused
kernels are used.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from clusterft.config.spec import JobSpec
from clusterft.errors import UserError
from clusterft.train.plan import RunPlan

ZERO_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "tensor": 0}
# DeepSpeed's defaults for the bucket sizes when the model's hidden size is unknown.
DEFAULT_BUCKET_SIZE = 500_000_000
NO_PRINT = 10**9  # DeepSpeed prints a line every `steps_per_print` steps; we have our own progress bar


def zero_stage(spec: JobSpec) -> int:
    """The ZeRO stage the spec asks for (pipeline: 0 or 1)."""
    if spec.parallel.strategy == "pipeline":
        return spec.parallel.pipeline_zero_stage
    return ZERO_STAGE[spec.parallel.strategy]


FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2}
"""Dynamic loss scaling (loss_scale 0), DeepSpeed's defaults written out."""


def build_deepspeed_config(spec: JobSpec, plan: RunPlan, *, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for `spec` run as `plan` says.

    The batch sizes are the plan's, not the spec's: a run resumed on another number of workers
    keeps its global batch, so its micro-batch per worker differs from per_device_train_batch_size.
    `hidden_size` (the model's) sizes the communication buckets the way the HF integration's "auto"
    does; without it DeepSpeed's defaults are used. A raw `parallel.deepspeed` JSON, if given, is
    used instead, with its "auto" values resolved from the spec.
    """
    if spec.parallel.deepspeed:
        return resolve_raw_config(spec, plan, load_raw_config(spec.parallel.deepspeed), hidden_size)
    train, parallel = spec.train, spec.parallel
    config: dict[str, Any] = {
        **_batch_keys(spec, plan),
        "gradient_clipping": train.max_grad_norm,
        "optimizer": _optimizer(spec),
        "zero_optimization": _zero_section(spec, hidden_size),
        "steps_per_print": NO_PRINT,
        "wall_clock_breakdown": False,
    }
    if train.bf16:  # the spec allows bf16/fp16 on GPUs only
        config["bf16"] = {"enabled": True}
    if train.fp16:
        config["fp16"] = {"enabled": True, **FP16_LOSS_SCALING}
    if parallel.strategy == "pipeline":
        # Activation checkpointing inside the pipe is set on the PipelineModule; these partition the
        # activations/gradients sent between stages across the tensor-parallel group (size 1 here).
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if parallel.strategy == "tensor":
        config["tensor_parallel"] = {"autotp_size": parallel.tensor_parallel_size}
    return config


def _batch_keys(spec: JobSpec, plan: RunPlan) -> dict[str, int]:
    micro, accumulation = plan.micro_batch_size, plan.gradient_accumulation_steps
    # DeepSpeed checks train_batch_size against its own idea of the data-parallel size, which under
    # AutoTP is the whole world (tensor-parallel ranks are fed the same batch).
    ranks = plan.world_size if spec.parallel.strategy == "tensor" else plan.data_parallel_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * ranks,
    }


def _optimizer(spec: JobSpec) -> dict[str, Any]:
    params: dict[str, Any] = {
        "lr": spec.train.learning_rate,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": spec.train.weight_decay,
    }
    if not spec.cluster.use_gpu:
        params["torch_adam"] = True  # FusedAdam / DeepSpeedCPUAdam would JIT-compile ~45 s per worker
    return {"type": "AdamW", "params": params}


def _zero_section(spec: JobSpec, hidden_size: int | None, stage: int | None = None) -> dict[str, Any]:
    stage = zero_stage(spec) if stage is None else stage
    on_gpu = spec.cluster.use_gpu
    section: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return section
    bucket = hidden_size * hidden_size if hidden_size else DEFAULT_BUCKET_SIZE
    section.update(
        {
            # Overlap needs separate CUDA streams; on CPU it only adds copies.
            "overlap_comm": on_gpu,
            # Copy gradients into one contiguous buffer as they are produced: less fragmentation.
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "round_robin_gradients": False,
        }
    )
    if stage == 3:
        section.update(
            {
                "stage3_prefetch_bucket_size": int(0.9 * bucket),
                # Small parameters (norms, biases) stay whole on every rank: gathering them costs more.
                "stage3_param_persistence_threshold": 10 * hidden_size if hidden_size else 100_000,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    offload = spec.parallel.offload
    if offload in ("optimizer", "optimizer+params"):
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if offload == "optimizer+params":
        section["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return section


def load_raw_config(path: str) -> dict[str, Any]:
    """Read a user's DeepSpeed JSON, naming the file in any error."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"parallel.deepspeed: {path} not found; give the path of a DeepSpeed JSON") from None
    except json.JSONDecodeError as err:
        raise UserError(f"parallel.deepspeed: {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"parallel.deepspeed: {path} must hold a JSON object")
    return raw


def resolve_raw_config(
    spec: JobSpec, plan: RunPlan, raw: dict[str, Any], hidden_size: int | None = None
) -> dict[str, Any]:
    """Replace the "auto" values of a raw DeepSpeed config with the spec's, as the HF Trainer does.

    The batch sizes are always the plan's: the workers are fed the plan's batches whatever the JSON
    says. The learning-rate schedule is the spec's (`lr_scheduler_type`, warmup): a "scheduler"
    section would silently override it, so it is refused.
    """
    config = copy.deepcopy(raw)
    if "scheduler" in config:
        raise UserError(
            "parallel.deepspeed: remove the JSON's 'scheduler' section; the schedule comes from "
            "lr_scheduler_type / warmup_steps / warmup_ratio"
        )
    config.update(_batch_keys(spec, plan))
    _fill(config, "gradient_clipping", spec.train.max_grad_norm)
    config.setdefault("steps_per_print", NO_PRINT)
    optimizer = config.setdefault("optimizer", _optimizer(spec))
    for key, value in _optimizer(spec)["params"].items():
        _fill(optimizer.setdefault("params", {}), key, value)
    for precision in ("bf16", "fp16"):
        if precision in config:
            wanted = spec.train.bf16 if precision == "bf16" else spec.train.fp16
            _fill(config[precision], "enabled", wanted)
    zero = config.setdefault("zero_optimization", {"stage": zero_stage(spec)})
    defaults = _zero_section(spec, hidden_size, stage=int(zero.get("stage", zero_stage(spec))))
    for key, value in zero.items():
        if value == "auto":
            if key not in defaults:
                raise UserError(f"parallel.deepspeed: zero_optimization.{key}: 'auto' is not resolvable here")
            zero[key] = defaults[key]
    unresolved = [key for key, value in _walk(config) if value == "auto"]
    if unresolved:
        raise UserError(f"parallel.deepspeed: cannot resolve 'auto' for {', '.join(unresolved)}; set a value")
    return config


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` when missing or "auto"; a user's explicit value wins."""
    if section.get(key, "auto") == "auto":
        section[key] = value


def _walk(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [item for key, value in node.items() for item in _walk(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), node)]
