"""The job spec: one frozen, validated object built once from YAML and passed down explicitly.

A LLaMA-Factory training YAML is a valid job as it is: its flat keys (`model_name_or_path`,
`finetuning_type`, `lora_rank`, `dataset`, `cutoff_len`, ...) keep their LLaMA-Factory meaning and
are grouped here into `model`, `method`, `data` and `train`. clusterft adds sections of its own:
`cluster`, `parallel`, `checkpoint`, `failure`, `resume`, `eval`, `promote` and `callbacks`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TEMPLATES = ("default", "alpaca", "chatml", "qwen", "llama3", "tokenizer")


class Section(BaseModel):
    """Base of every spec section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _split_csv(value: Any) -> Any:
    """LLaMA-Factory writes lists as comma-separated strings (`dataset: a,b`); accept both forms."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def known_template(value: str) -> str:
    """A chat template name clusterft renders (or `tokenizer`: the model's own chat_template)."""
    if value not in TEMPLATES:
        raise ValueError(f"unknown template {value!r}; choose one of {', '.join(TEMPLATES)}")
    return value


# ---------------------------------------------------------------- LLaMA-Factory's flat keys


class ModelArgs(Section):
    model_name_or_path: str = Field(description="Local HF model directory (or a path on shared storage).")
    adapter_name_or_path: str | None = Field(
        default=None, description="A peft adapter to start from (LoRA continued training)."
    )
    trust_remote_code: bool = Field(default=False, description="Allow custom modeling code in the model dir.")


class MethodArgs(Section):
    stage: Literal["sft"] = Field(
        default="sft", description="Training stage; clusterft runs supervised fine-tuning (sft)."
    )
    finetuning_type: Literal["lora", "full", "freeze"] = Field(
        default="lora", description="lora (peft adapter), full (every weight), freeze (last N layers only)."
    )
    lora_rank: int = Field(default=8, gt=0, description="LoRA rank r.")
    lora_alpha: int | None = Field(default=None, gt=0, description="LoRA alpha; default 2 × lora_rank.")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: list[str] = Field(
        default=["all"],
        description="`all` (every linear layer but lm_head) or module names, e.g. q_proj,v_proj.",
    )
    freeze_trainable_layers: int = Field(
        default=2, gt=0, description="freeze: number of last decoder layers that are trained."
    )

    _split_target = field_validator("lora_target", mode="before")(_split_csv)

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


class DataArgs(Section):
    dataset: list[str] = Field(description="Dataset names registered in dataset_dir/dataset_info.json.")
    eval_dataset: list[str] | None = Field(
        default=None, description="Datasets for evaluation; default: a val_size split of `dataset`."
    )
    dataset_dir: str = Field(default="data", description="Directory holding dataset_info.json and the files.")
    template: str = Field(
        default="default",
        description="Chat template: default | alpaca | chatml | qwen | llama3 | tokenizer (the model's own).",
    )
    cutoff_len: int = Field(default=1024, gt=0, description="Maximum tokens per example (prompt + response).")
    val_size: float = Field(
        default=0.0,
        ge=0.0,
        description="Held-out eval split: a fraction (< 1) or a number of examples (≥ 1).",
    )
    max_samples: int | None = Field(
        default=None, gt=0, description="Use at most this many examples per dataset."
    )
    train_on_prompt: bool = Field(default=False, description="Also compute the loss on prompt tokens.")
    mask_history: bool = Field(default=False, description="Train only on the last assistant turn.")
    preprocessing_num_workers: int | None = Field(
        default=None, gt=0, description="Processes tokenizing the dataset (default: in the calling process)."
    )
    packing: bool = Field(
        default=False, description="Pack examples into sequences of up to cutoff_len tokens (in data order)."
    )
    neat_packing: bool = Field(
        default=False,
        description="Pack without cross-attention: positions restart per example, attention stays within it.",
    )
    streaming: bool = Field(
        default=False,
        description="Read JSON Lines one record at a time and shuffle in blocks of buffer_size rows.",
    )
    buffer_size: int = Field(
        default=16384, gt=0, description="Streaming: rows per shuffled block (consecutive rows of the cache)."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where the tokenized dataset is cached (default: output_dir/.clusterft/data_cache).",
    )

    _split_datasets = field_validator("dataset", "eval_dataset", mode="before")(_split_csv)

    _known_template = field_validator("template")(known_template)

    @field_validator("dataset")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no dataset given; name at least one dataset from dataset_info.json")
        return value


class TrainArgs(Section):
    do_train: bool = Field(
        default=True, description="Run training (LLaMA-Factory key; must be true for train)."
    )
    do_eval: bool = Field(default=False, description="Evaluate on the eval split after training.")
    output_dir: str = Field(description="Where the final adapter/model, metrics.jsonl and loss.png go.")
    overwrite_output_dir: bool = Field(
        default=False, description="Allow writing into a non-empty output_dir."
    )
    per_device_train_batch_size: int = Field(default=1, gt=0, description="Micro-batch size per worker.")
    per_device_eval_batch_size: int = Field(default=8, gt=0, description="Eval batch size per worker.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(
        default=3.0, ge=0, description="Epochs to train (ignored if max_steps > 0)."
    )
    max_steps: int = Field(default=-1, description="Optimizer steps to train; -1 means use num_train_epochs.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = Field(default="linear", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    warmup_steps: int = Field(default=0, ge=0, description="Warmup steps (wins over warmup_ratio when > 0).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm; 0 disables.")
    bf16: bool = Field(default=False, description="Train in bfloat16 (GPU only).")
    fp16: bool = Field(default=False, description="Train in float16 (GPU only).")
    seed: int = Field(default=42, description="Seed of model init, data order and dropout.")
    save_steps: int = Field(default=500, gt=0, description="Write a checkpoint every N optimizer steps.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    plot_loss: bool = Field(default=True, description="Write loss.png to output_dir.")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default=[],
        description="Also write training scalars to tensorboard (output_dir/runs) and/or mlflow "
        "($MLFLOW_TRACKING_URI, default output_dir/mlruns); none: metrics.jsonl only.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_targets(cls, value: Any) -> Any:
        """LLaMA-Factory's forms: `none`, one name, `a,b`, or a list; `none` means no tracker."""
        targets = [] if value is None else _split_csv(value)
        if isinstance(targets, list):
            targets = [t for t in targets if t != "none"]
            unknown = [t for t in targets if t not in ("tensorboard", "mlflow")]
            if unknown:
                raise ValueError(
                    f"report_to: {unknown[0]!r} is not supported here; use tensorboard, mlflow or none"
                )
        return targets

    @model_validator(mode="after")
    def _check(self) -> TrainArgs:
        if not self.do_train:
            raise ValueError(
                "do_train is false: a job spec trains; to only evaluate a model use `clusterft eval`"
            )
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one (or neither for fp32)")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("nothing to train: set max_steps > 0 or num_train_epochs > 0")
        return self


# ---------------------------------------------------------------- clusterft's sections


class ClusterSpec(Section):
    address: str | None = Field(
        default=None, description="Ray address; default: RAY_ADDRESS if set, else a local cluster."
    )
    num_workers: int | tuple[int, int] = Field(
        default=2,
        description="Ray Train workers (processes), or [min, max]: elastic, it trains on as many as the "
        "cluster has room for (at least min) and grows back to max when nodes return.",
    )
    elastic_resize_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="Elastic: how often a running job checks for room for more workers (growing "
        "restarts it from its newest checkpoint).",
    )
    cpus_per_worker: float = Field(default=1.0, ge=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per worker; > 0 trains on GPU.")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_range(cls, value: Any) -> Any:
        """An int >= 1, or [min, max] with 1 <= min <= max (a YAML list: Ray Train's elastic tuple)."""
        if isinstance(value, list | tuple):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"give a number of workers or [min, max] of two integers, not {value!r}")
            if not 1 <= value[0] <= value[1]:
                raise ValueError(f"[min, max] needs 1 <= min <= max, not {list(value)!r}")
            return value[0] if value[0] == value[1] else tuple(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"give a number of workers or [min, max] of two integers, not {value!r}")
        if value < 1:
            raise ValueError(f"needs at least 1 worker, not {value}")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class ParallelSpec(Section):
    strategy: Literal["ddp", "zero1", "zero2", "zero3", "pipeline", "tensor"] = Field(
        default="ddp", description="ddp | zero1 | zero2 | zero3 | pipeline | tensor."
    )
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        default="none", description="ZeRO CPU offload: optimizer state (zero1/2/3) or also params (zero3)."
    )
    pipeline_stages: int = Field(default=2, gt=0, description="pipeline: number of stages.")
    pipeline_zero_stage: Literal[0, 1] = Field(
        default=0, description="pipeline: ZeRO stage combined with it (DeepSpeed allows at most 1)."
    )
    tensor_parallel_size: int = Field(default=2, gt=0, description="tensor: model-parallel degree.")
    deepspeed: str | None = Field(
        default=None, description='A raw DeepSpeed JSON for experts; its "auto" values come from the spec.'
    )

    @model_validator(mode="after")
    def _check(self) -> ParallelSpec:
        if self.offload == "optimizer+params" and self.strategy != "zero3":
            raise ValueError(
                "offload: optimizer+params needs strategy zero3 (only ZeRO-3 partitions parameters)"
            )
        if self.offload != "none" and self.strategy not in ("zero1", "zero2", "zero3"):
            raise ValueError(f"offload needs a ZeRO strategy (zero1/zero2/zero3), not {self.strategy}")
        return self


class CheckpointSpec(Section):
    storage_path: str | None = Field(
        default=None,
        description="Shared storage (local dir, NFS path, or pyarrow URI); default output_dir/ckpt.",
    )
    name: str | None = Field(
        default=None, description="Run name under storage_path; default from output_dir."
    )
    keep_last: int = Field(
        default=3, gt=0, description="Checkpoints kept; the newest valid one is never pruned."
    )


class FailureSpec(Section):
    max_failures: int = Field(
        default=3, ge=-1, description="Worker-group restarts inside a run (-1: unlimited)."
    )
    max_job_restarts: int = Field(default=3, ge=0, description="Controller relaunches of a failed run.")
    backoff_s: float = Field(default=2.0, ge=0, description="First relaunch delay; doubles each time.")


class ResumeSpec(Section):
    enabled: bool = Field(default=True, description="Resume from the newest valid checkpoint if one exists.")
    weights_only: bool = Field(
        default=False,
        description="Restore weights only (no optimizer/scheduler/data position) after a change.",
    )
    from_checkpoint: str | None = Field(
        default=None, description="Resume from this checkpoint bundle instead."
    )

    @field_validator("from_checkpoint")
    @classmethod
    def _bundle_path(cls, value: str | None) -> str | None:
        # Whether the bundle exists and verifies is known only where the job runs (the driver
        # checks it before any worker starts); what the path's form rules out is known here.
        if value is not None and "://" in value:
            raise ValueError(
                f"{value} is a URI, but a bundle to resume from is read as a filesystem path; give "
                "its directory on a local or shared filesystem (e.g. /mnt/ckpt/run/bundles/step_000000004)"
            )
        return value


class EvalSpec(Section):
    enabled: bool = Field(default=True, description="Evaluate the trained model before registering it.")
    dataset: list[str] | None = Field(
        default=None, description="Eval datasets; default: the job's eval split."
    )
    metrics: list[Literal["loss", "perplexity", "nll", "nll_perplexity", "exact_match", "number_match"]] = (
        Field(
            default=["loss", "perplexity", "exact_match"],
            description="Metrics to compute: loss and perplexity (teacher-forced, HF forward), nll and "
            "nll_perplexity (the same per-answer-token log-likelihood scored by the serving engine's "
            "prompt_logprobs), exact_match (the greedy answer equals the reference up to whitespace), "
            "number_match (GSM8K style: the answer's final number, after `####` or else the last one, "
            "equals the reference's).",
        )
    )
    max_new_tokens: int = Field(
        default=32, gt=0, description="Generation length for exact_match and number_match."
    )
    max_samples: int | None = Field(default=None, gt=0, description="Evaluate at most this many examples.")

    _split = field_validator("dataset", mode="before")(_split_csv)


# Which way each eval metric improves: promotion gates (controller/policy.py) and the canary's
# automatic rollback (serve/canary.py) read it here, so the two cannot disagree.
EVAL_METRICS = frozenset(get_args(get_args(EvalSpec.model_fields["metrics"].annotation)[0]))
HIGHER_IS_BETTER = frozenset({"exact_match", "number_match"})
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "nll", "nll_perplexity"})
assert EVAL_METRICS == HIGHER_IS_BETTER | LOWER_IS_BETTER, "a new eval metric needs a direction here"


class PromoteSpec(Section):
    model_name: str | None = Field(
        default=None, description="Registry name; default: output_dir's last part."
    )
    gates: list[str] = Field(default=[], description='Conditions on eval metrics, e.g. "exact_match >= 0.8".')
    not_worse_than_production: bool = Field(
        default=True, description="Also require every gated metric to be at least production's."
    )
    alias: Literal["production", "canary"] = Field(
        default="production", description="Alias moved on success."
    )
    auto: bool = Field(
        default=False,
        description="Without gates, move the alias anyway; off: the version is only registered.",
    )
    merge: bool = Field(
        default=False,
        description="Register the LoRA adapter merged into its base, after the merge-equivalence check.",
    )


# ---------------------------------------------------------------- the job


class JobSpec(Section):
    model: ModelArgs
    method: MethodArgs = MethodArgs()
    data: DataArgs
    train: TrainArgs
    cluster: ClusterSpec = ClusterSpec()
    parallel: ParallelSpec = ParallelSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    failure: FailureSpec = FailureSpec()
    resume: ResumeSpec = ResumeSpec()
    eval: EvalSpec = EvalSpec()
    promote: PromoteSpec = PromoteSpec()
    callbacks: list[str] = Field(
        default=[], description="Dotted paths of callback classes (on_step_end, on_checkpoint, ...)."
    )

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        parallel, workers = self.parallel, self.cluster.num_workers
        self._check_elastic()
        if parallel.strategy == "pipeline" and workers % parallel.pipeline_stages:
            raise ValueError(
                f"parallel.pipeline_stages={parallel.pipeline_stages} must divide "
                f"cluster.num_workers={workers}"
            )
        if parallel.strategy == "tensor" and workers % parallel.tensor_parallel_size:
            raise ValueError(
                f"parallel.tensor_parallel_size={parallel.tensor_parallel_size} must divide "
                f"cluster.num_workers={workers}"
            )
        if parallel.strategy in ("pipeline", "tensor") and self.method.finetuning_type != "full":
            raise ValueError(
                f"parallel.strategy {parallel.strategy} trains finetuning_type full only (its layers are "
                "rebuilt or split, which peft adapters do not survive); set finetuning_type: full, or use "
                f"ddp/zero* for {self.method.finetuning_type}"
            )
        for precision in ("bf16", "fp16"):
            if getattr(self.train, precision) and not self.cluster.use_gpu:
                # Refused rather than silently trained in fp32: DeepSpeed's CPU path trains fp32 here.
                raise ValueError(
                    f"{precision}: true trains on GPUs only (cluster.gpus_per_worker > 0); on CPU set "
                    f"{precision}: false to train in fp32"
                )
        if parallel.strategy == "pipeline" and self.data.neat_packing:
            raise ValueError(
                "data.neat_packing: the pipeline stages take input ids only, so packed examples would attend "
                "to each other; use packing: true (cross-attention, LLaMA-Factory's packing) or a ddp, zero* "
                "or tensor strategy"
            )
        if self.promote.merge and self.method.finetuning_type != "lora":
            raise ValueError(
                f"promote.merge: true merges a LoRA adapter into its base, but finetuning_type is "
                f"{self.method.finetuning_type}: the trained model is already a whole model; remove "
                "promote.merge (or train with finetuning_type: lora)"
            )
        return self

    def _check_elastic(self) -> None:
        """An elastic job trains on any worker count in [min, max] with the same global batch
        (per_device_train_batch_size × max per micro-step, split evenly): each count must divide
        it, and the strategy must be data parallel (pipeline stages and tensor slices are fixed)."""
        cluster = self.cluster
        if not cluster.elastic:
            return
        if self.parallel.strategy in ("pipeline", "tensor"):
            raise ValueError(
                f"cluster.num_workers: [min, max] (elastic) needs a data-parallel strategy (ddp, zero1, "
                f"zero2, zero3), not {self.parallel.strategy}, whose model split is fixed; give "
                "num_workers as one number"
            )
        batch = self.train.per_device_train_batch_size * cluster.max_workers
        uneven = [n for n in range(cluster.min_workers, cluster.max_workers + 1) if batch % n]
        if uneven:
            raise ValueError(
                f"cluster.num_workers {list(cluster.num_workers)}: the global micro-batch of {batch} "
                f"examples (per_device_train_batch_size × max) cannot be split evenly over {uneven[0]} "
                "workers; narrow the range or choose a batch size that every count divides"
            )

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the spec: two specs with equal hashes train the same run."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# Which group owns each flat (LLaMA-Factory) key. Derived from the models, so it cannot drift.
FLAT_GROUPS: dict[str, type[Section]] = {
    "model": ModelArgs,
    "method": MethodArgs,
    "data": DataArgs,
    "train": TrainArgs,
}
SECTIONS: dict[str, type[Section]] = {
    name: JobSpec.model_fields[name].annotation  # type: ignore[misc]
    for name in ("cluster", "parallel", "checkpoint", "failure", "resume", "eval", "promote")
}
