"""The training recipe each Ray Train worker runs: setup → resume → loop → report.

Setup happens in a fixed order (torchtune's): checkpoint → tokenizer and data → model → engine →
restored state. The loop is plain DeepSpeed: forward, `engine.backward`, `engine.step` per
micro-batch (DeepSpeed accumulates and steps the optimizer and LR schedule at the boundary).

What makes a resumed run bitwise equal to an uninterrupted one (CPU, fp32):
  - data order is a function of (seed, epoch) and the position is derived from the global step;
  - checkpoints are taken at optimizer-step boundaries, so no half-accumulated gradient is lost;
  - fp32 weights, AdamW moments and step, LR-scheduler state and every rank's RNG are restored
    exactly, each rank from the shards' ranges it holds (state.py); DeepSpeed's bucket order follows
    parameter order, which setup keeps fixed;
  - fp32 has no loss scaler; bf16/fp16 are GPU-only and not promised bitwise.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clusterft.config.spec import JobSpec
from clusterft.data import IGNORE_INDEX, build_datasets, collate, model_inputs, run_cache_dir
from clusterft.errors import UserError
from clusterft.hf.loading import load_model, load_tokenizer
from clusterft.hf.lora import apply_method, lora_target_modules
from clusterft.storage import BundleStore
from clusterft.train.checkpointing import (
    LoadedBundle,
    broadcast_object,
    load_bundle,
    read_shards,
    save_bundle,
    verified_bundle,
)
from clusterft.train.deepspeed_config import build_deepspeed_config
from clusterft.train.plan import check_resumable, compat_record, plan_run, warmup_steps
from clusterft.train.state import (
    Layout,
    gather_tensor_parallel_weights,
    layout,
    load_weights,
    local_tensor_parallel_state,
    model_state_bytes,
    restore_moments,
    restore_tensor_parallel_state,
    rng_state,
    seed_everything,
    set_rng_state,
    shard_state,
    whole_tensors_shard,
)


@dataclass(frozen=True)
class RunContext:
    """What the driver tells every worker besides the spec (all plain values: it crosses processes)."""

    bundle_root: str  # where this run's checkpoint bundles live (local dir or URI)
    base_dir: str  # relative paths in the spec are relative to the driver's working directory
    run_dir: str  # local dir for worker pid files (fault tests kill a worker by its pid)
    start_from: str | None = None  # the bundle the driver chose to start from (checkpointing.start_run)


def resolve(base_dir: str, path: str) -> Path:
    return Path(path) if os.path.isabs(path) else Path(base_dir) / path


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config` holds the spec (as JSON data), the run context and the queue."""
    from clusterft.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    recipe = Recipe(
        JobSpec.model_validate(config["spec"]), RunContext(**config["run"]), config.get("progress")
    )
    recipe.setup()
    recipe.train()


def import_deepspeed() -> Any:
    """`import deepspeed` without the `import mlflow` its autotuner makes whenever mlflow is installed:
    ~1.1 of deepspeed's ~1.3 CPU-s import in every worker process, for autotuning clusterft never
    runs (report_to: mlflow tracks in the driver, which imports mlflow itself)."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


class Recipe:
    """One worker's share of a run. `setup()` builds everything in a fixed order; `train()` loops."""

    def __init__(self, spec: JobSpec, run: RunContext, progress: Any = None):
        import ray.train

        self.spec, self.run, self.progress = spec, run, progress
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.store = BundleStore(run.bundle_root)
        self.pipeline = spec.parallel.strategy == "pipeline"

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        spec = self.spec
        self._write_pid()
        seed_everything(spec.train.seed)
        self.model_dir = resolve(self.run.base_dir, spec.model.model_name_or_path)
        resumed = self._load_checkpoint()

        self.tokenizer = load_tokenizer(self.model_dir, spec.model.trust_remote_code)
        # Tokenized once by the driver's preflight into the run's cache; here memory-mapped. The
        # driver hashed every file of it just before: unchanged files are not hashed again.
        self.train_data = build_datasets(
            spec.data,
            self.tokenizer,
            seed=spec.train.seed,
            base_dir=self.run.base_dir,
            default_cache_dir=run_cache_dir(self.run.run_dir),
            trust_verified=True,
        ).train
        trainer = resumed.trainer if resumed else {}
        # weights_only drops optimizer, schedule and data position of a checkpoint from a different
        # spec; the run's own checkpoints (same spec hash) always resume exactly.
        self.exact_resume = resumed is not None and (
            not spec.resume.weights_only or trainer["spec_hash"] == spec.spec_hash()
        )
        geometry = trainer.get("global_micro_batch") if self.exact_resume else None
        self.plan = plan_run(spec, self.world_size, len(self.train_data), geometry)
        # Tokens trained on per example (labels shifted by one): the loss divides by the global count.
        self.label_counts = self.train_data.label_counts()

        from clusterft.data import EpochBatchSampler

        self.dp_rank, self.model_parallel = self._data_parallel_rank()
        self.sampler = EpochBatchSampler(
            len(self.train_data),
            micro_batch_size=self.plan.micro_batch_size,
            world_size=self.plan.data_parallel_size,
            rank=self.dp_rank,
            seed=spec.train.seed,
            shuffle_block=self.train_data.shuffle_block,  # streaming: blocks of consecutive rows
        )
        self.engine, self.named_params, self.compat = self._build_engine(resumed)
        self.start_step = 0
        if resumed is not None:
            check_resumable(trainer["compat"], self.compat, not self.exact_resume, resumed.name)
            if self.exact_resume:
                self._restore_training_state(resumed)
        self.resumed_from = resumed.name if resumed else None
        self._send("start", planned_steps=self.plan.total_steps, resumed_from=self.resumed_from,
                   start_step=self.start_step, world_size=self.world_size)  # fmt: skip

    def _write_pid(self) -> None:
        pids = Path(self.run.run_dir) / "workers"
        pids.mkdir(parents=True, exist_ok=True)
        (pids / f"rank-{self.rank}.pid").write_text(str(os.getpid()))

    def _load_checkpoint(self) -> LoadedBundle | None:
        """The bundle to resume from (rank 0 picks, every rank reads).

        This run's own newest valid bundle comes first: after a worker failure the run continues
        from its own progress. Without one, the bundle the driver chose to start from, if any.
        """
        location = None
        if self.rank == 0:
            info = self.store.find_latest_valid()
            if info is not None:
                location = (str(self.store.storage.uri), info.name)
            elif self.run.start_from is not None:
                store, checked = verified_bundle(self.run.start_from)
                location = (str(store.storage.uri), checked.name)
        location = broadcast_object(location)
        return load_bundle(BundleStore(location[0]), location[1], self.rank) if location else None

    def _data_parallel_rank(self) -> tuple[int, bool]:
        """(data-parallel rank, whether model parallel). DeepSpeed's pipe topology puts the data axis
        innermost (rank = stage * dp + dp_rank); AutoTP groups consecutive ranks likewise."""
        dp = self.plan.data_parallel_size
        if self.spec.parallel.strategy in ("pipeline", "tensor"):
            return self.rank % dp, True
        return self.rank, False

    def _build_engine(self, resumed: LoadedBundle | None):
        """Model → method → saved weights → DeepSpeed engine (with optimizer and LR schedule)."""
        from transformers import get_scheduler

        deepspeed = import_deepspeed()

        spec = self.spec
        # DeepSpeed adopts the gloo/nccl process group Ray Train created (PipelineModule needs it first).
        deepspeed.init_distributed(dist_backend="nccl" if spec.cluster.use_gpu else "gloo")
        if self.pipeline:
            from clusterft.train.pipeline import build_pipeline_engine_inputs

            model, named, hidden_size = build_pipeline_engine_inputs(self.model_dir, spec)
            targets: list[str] = []
        else:
            model = load_model(self.model_dir, trust_remote_code=spec.model.trust_remote_code)
            targets = lora_target_modules(model, spec.method.lora_target)
            seed_everything(spec.train.seed)  # LoRA's random init: identical on every rank and restart
            model = apply_method(model, spec.method, spec.model)
            if spec.train.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.config.use_cache = False
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            hidden_size = model.config.hidden_size
        if resumed is not None:
            # Whole weights into the module, each range from the shard that holds it; DeepSpeed
            # makes its (partitioned) fp32 copies from them.
            load_weights(named, read_shards(resumed))
        compat = compat_record(spec, self.model_dir, self.train_data, targets)
        config = build_deepspeed_config(spec, self.plan, hidden_size=hidden_size)
        total = self.plan.total_steps

        def schedule(optimizer):
            return get_scheduler(
                spec.train.lr_scheduler_type,
                optimizer,
                num_warmup_steps=warmup_steps(spec, total),
                num_training_steps=total,
            )

        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for _, p in named], config=config, lr_scheduler=schedule
        )
        return engine, named, compat

    def _restore_training_state(self, resumed: LoadedBundle) -> None:
        trainer = resumed.trainer
        if self.spec.parallel.strategy == "tensor":
            if resumed.local is None or trainer["world_size"] != self.world_size:
                raise UserError(
                    f"{resumed.name}: a tensor-parallel checkpoint resumes on the same number of workers "
                    f"({trainer['world_size']}); use resume: {{weights_only: true}} to change it"
                )
            restore_tensor_parallel_state(self.engine, self.named_params, resumed.local)
        else:
            restore_moments(self.engine, self._layout(), read_shards(resumed))
        scheduler = self.engine.lr_scheduler
        scheduler.load_state_dict(trainer["scheduler"])
        # LambdaLR.load_state_dict restores its counters, not the optimizer's current lr.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        self.start_step = trainer["global_step"]
        if resumed.rng is not None and trainer["world_size"] == self.world_size:
            set_rng_state(resumed.rng)
        else:  # a different worker count: ranks changed meaning, so reseed deterministically
            seed_everything(self.spec.train.seed + 7919 * self.start_step + self.rank)

    # ------------------------------------------------------------------ loop

    def train(self) -> None:
        import ray.train

        spec, plan = self.spec, self.plan
        step, loss = self.start_step, float("nan")
        while step < plan.total_steps:
            started = time.perf_counter()
            loss, tokens = self._train_step(step)
            step += 1
            elapsed = time.perf_counter() - started
            extra = (
                {"model_state_bytes": model_state_bytes(self.engine)} if step == self.start_step + 1 else {}
            )
            self._send(
                "step",
                **extra,
                step=step,
                loss=loss,
                lr=self.engine.get_lr()[0],
                grad_norm=_float(self.engine.get_global_grad_norm()),
                tokens_per_s=tokens / elapsed,
                peak_memory_mb=peak_memory_mb(),
            )
            if step % spec.train.save_steps == 0 or step == plan.total_steps:
                self._save(step, loss)
        if self.start_step == plan.total_steps:  # nothing left to do: report so the run has metrics
            ray.train.report({"global_step": step, "loss": loss})
        self._send("end", step=step)

    def _train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step: `gradient_accumulation_steps` micro-batches. Returns (loss, tokens)."""
        if self.pipeline:
            from clusterft.train.pipeline import pipeline_step

            examples = [
                [self.train_data[i] for i in self.sampler.batch(*self.plan.position(step, micro))]
                for micro in range(self.plan.gradient_accumulation_steps)
            ]
            return pipeline_step(
                self.engine, examples, self.tokenizer.pad_token_id, self.spec.data.cutoff_len
            )
        device = self.engine.device
        loss_sum, label_total, tokens = torch.zeros((), device=device), 0, 0
        for micro in range(self.plan.gradient_accumulation_steps):
            epoch, micro_step = self.plan.position(step, micro)
            indices = self.sampler.batch(epoch, micro_step)
            global_labels = sum(self.label_counts[i] for i in self.sampler.global_batch(epoch, micro_step))
            batch = collate([self.train_data[i] for i in indices], self.tokenizer.pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            logits = self.engine(**model_inputs(batch)).logits  # neat packing: per-example positions
            # (B, T, V) predicts token t+1 from t; summed here, divided by the GLOBAL label count, so the
            # loss (and gradient) is the same token mean whatever the number of workers.
            summed = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                batch["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            # DeepSpeed averages gradients over data-parallel ranks: undo it to get the global mean.
            self.engine.backward(summed * self.plan.data_parallel_size / global_labels)
            self.engine.step()
            loss_sum += summed.detach()
            label_total += global_labels
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
            if self.model_parallel:  # every model-parallel rank of a group computed the same loss
                loss_sum /= self.world_size // self.plan.data_parallel_size
        return float(loss_sum) / label_total, tokens

    # ------------------------------------------------------------------ checkpoint

    def _save(self, step: int, loss: float) -> None:
        import ray.train

        spec, plan = self.spec, self.plan
        local_state = None
        if self.spec.parallel.strategy == "tensor":
            # AutoTP slices weights and moments by rank, not in flat ranges: rank 0 writes the gathered
            # full weights (export, weights-only starts) and every rank its own slices (resume needs
            # the same tensor_parallel_size).
            full = gather_tensor_parallel_weights(self.engine)
            shard = whole_tensors_shard(full) if self.rank == 0 else None
            local_state = local_tensor_parallel_state(self.engine, self.named_params)
        else:
            shard = shard_state(self.engine, self._layout())
        epoch, micro_step = plan.position(step)
        trainer = None
        if self.rank == 0:
            trainer = {
                "global_step": step,
                "epoch": epoch,
                "micro_step": micro_step,
                "global_micro_batch": plan.global_micro_batch,
                "world_size": self.world_size,
                "total_steps": plan.total_steps,
                "scheduler": self.engine.lr_scheduler.state_dict(),
                "compat": self.compat,
                "spec_hash": spec.spec_hash(),
            }
        meta = {
            "global_step": step,
            "loss": loss,
            "world_size": self.world_size,
            "strategy": spec.parallel.strategy,
            "finetuning_type": spec.method.finetuning_type,
            "spec_hash": spec.spec_hash(),
        }
        started = time.perf_counter()
        info = save_bundle(
            self.store,
            step,
            rank=self.rank,
            shard=shard,
            trainer=trainer,
            rng=rng_state(),
            meta=meta,
            keep_last=spec.checkpoint.keep_last,
            local_state=local_state,
        )
        metrics = {"global_step": step, "loss": loss}
        if info is None:
            ray.train.report(metrics)
            return
        self._send("checkpoint", step=step, name=info.name, bytes=info.size_bytes,
                   seconds=time.perf_counter() - started)  # fmt: skip
        # Ray Train records a pointer to the bundle (its own copy would skip our manifest checks).
        with tempfile.TemporaryDirectory() as pointer:
            Path(pointer, "bundle.json").write_text(
                json.dumps({"bundle": f"{self.store.storage.uri}/{info.name}", "global_step": step})
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(pointer))

    def _layout(self) -> Layout:
        """Where this rank's share of the training state lives (what it saves and restores)."""
        return layout(self.engine, self.named_params, self.dp_rank, self.plan.data_parallel_size)

    def _send(self, event: str, **fields: Any) -> None:
        """Progress to the driver's queue (rank 0 only; best effort: a full queue drops nothing vital)."""
        if self.rank == 0 and self.progress is not None:
            self.progress.put({"event": event, "time": time.time(), **fields})


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def peak_memory_mb() -> float:
    """Peak resident memory of this worker process (GPU: peak allocated)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
