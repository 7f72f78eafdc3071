"""Tensor-parallel worker actors: each holds one shard of the model (its attention heads and MLP slice)
and a cache engine with its heads' part of every KV block; together they run one forward pass per step.

    engine replica --SchedulerOutput--> rank 0 --+-- all_reduce (gloo on CPU, NCCL on GPU) --+
                   --SchedulerOutput--> rank 1 --+                                            |
                   <--ModelRunnerOutput-- rank 0 (sampled tokens, broadcast to the others) --+

Every rank runs the engine's own ModelRunner on the same SchedulerOutput, so per-request state (token
ids, block tables) stays identical everywhere. Rank 0's sampled tokens are broadcast and overwrite the
others' so that random sampling can never make the shards' histories diverge.
"""

from __future__ import annotations

import datetime
import socket
import uuid
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clusterft.engine import EngineConfig
from clusterft.engine.executor import (
    Executor,
    build_model_runner,
    kv_cache_blocks,
    load_worker_model,
    worker_kv_budget,
)
from clusterft.engine.lora import adapter_dir
from clusterft.engine.model_runner import ModelRunner
from clusterft.engine.models import ModelConfig, ParallelContext
from clusterft.engine.outputs import ModelRunnerOutput, SchedulerOutput
from clusterft.errors import UserError


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone; the step it was in cannot complete."""


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


class TPWorker:
    """One rank. Created by WorkerGroup as a Ray actor inside the replica's placement group."""

    def __init__(self, rank: int, world_size: int) -> None:
        from clusterft.runtime import apply_runtime_defaults

        apply_runtime_defaults()
        self.rank, self.world_size = rank, world_size
        self.runner: ModelRunner | None = None

    def rendezvous_address(self) -> str:
        """A tcp:// address on this node for the process group (asked of rank 0)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def load(self, init_method: str, model_dir: str, config: EngineConfig) -> int:
        """Join the process group, load this rank's shard; the KV bytes this rank may allocate (every
        rank profiles at once: the profile's forward pass runs the collectives)."""
        backend = "nccl" if config.device == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=120)
        dist.init_process_group(
            backend, init_method=init_method, rank=self.rank, world_size=self.world_size, timeout=timeout
        )
        self.config = config
        self.pc = ParallelContext(self.rank, self.world_size, _all_reduce)
        self.model = load_worker_model(model_dir, config, self.pc)
        return worker_kv_budget(config, self.model, self.pc)

    def allocate(self, num_gpu_blocks: int, num_cpu_blocks: int) -> bool:
        """Allocate this rank's heads of the blocks every rank agreed on."""
        self.runner = build_model_runner(self.model, self.config, num_gpu_blocks, num_cpu_blocks, self.pc)
        return True

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | dict[str, str]:
        """Rank 0's output; another rank's failed requests (an adapter it could not load while rank 0
        could), which the group adds to rank 0's."""
        out = self.runner.execute_model(so)
        if self.world_size > 1 and out.req_ids:
            sampled = torch.tensor([-1 if t is None else t for t in out.sampled_token_ids], dtype=torch.long)
            dist.broadcast(sampled, src=0)
            if self.rank:
                for req_id, token_id in zip(out.req_ids, sampled.tolist(), strict=True):
                    if token_id >= 0:
                        self.runner.requests[req_id].token_ids[-1] = token_id
        return out if self.rank == 0 else out.errors

    def add_lora(self, name: str, path: str) -> str:
        """Register adapter `name` on this rank; the sha256 of the bytes this rank read."""
        self.runner.lora_manager.add_lora(name, path)
        return self.runner.lora_manager.digests[name]

    def lora_digests(self) -> dict[str, str]:
        return dict(self.runner.lora_manager.digests)

    def remove_lora(self, name: str) -> None:
        self.runner.lora_manager.remove_lora(name)

    def ping(self) -> bool:
        return True


class WorkerLoRARegistry:
    """The replica's adapter names (the engine's add_request checks them); changes go to every rank."""

    def __init__(self, workers: WorkerGroup, lora_modules: tuple[tuple[str, str], ...]) -> None:
        self.workers = workers
        self.paths = {name: Path(path) for name, path in lora_modules}  # the ranks loaded these in setup
        ranks = workers.call("lora_digests")
        self.digests = {name: _agreed(name, [digests[name] for digests in ranks]) for name in self.paths}

    def add_lora(self, name: str, path: str | Path) -> None:
        """Every rank reads and checks its shard of the adapter; a refusal is the ranks' own error
        (ValueError / FileNotFoundError naming the problem), not Ray's wrapper with a traceback."""
        path = adapter_dir(name, path)
        try:
            digest = _agreed(name, self.workers.call("add_lora", name, str(path)))
        except (ray.exceptions.RayTaskError, ValueError) as exc:
            self.workers.call("remove_lora", name)  # ranks that accepted it forget it again
            self.paths.pop(name, None)
            self.digests.pop(name, None)
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            if isinstance(cause, ValueError | FileNotFoundError):
                raise cause from None
            raise
        self.paths[name], self.digests[name] = path, digest

    def remove_lora(self, name: str) -> None:
        self.workers.call("remove_lora", name)
        self.paths.pop(name, None)
        self.digests.pop(name, None)


def _agreed(name: str, digests: list[str]) -> str:
    """The one digest every rank read for adapter `name`; a ValueError if its files changed while the
    ranks read them (each would serve a different adapter)."""
    if len(set(digests)) > 1:
        raise ValueError(
            f"LoRA {name!r}: its files changed while the tensor-parallel ranks read them; register it again"
        )
    return digests[0]


class WorkerGroup(Executor):
    """The replica's workers as the engine's Executor: a placement group with one bundle per rank,
    and the fan-out of every step and adapter change."""

    def __init__(
        self,
        model_dir: Path,
        config: EngineConfig,
        model_args: ModelConfig,
        *,
        tensor_parallel_size: int,
        num_cpus: float,
    ) -> None:
        args, tp = model_args, tensor_parallel_size
        if args.num_heads % tp or args.num_kv_heads % tp or args.intermediate_size % tp:
            raise UserError(
                f"tensor_parallel_size {tp} must divide the model's attention heads ({args.num_heads}), "
                f"KV heads ({args.num_kv_heads}) and intermediate_size ({args.intermediate_size})"
            )
        bundle: dict[str, float] = {"CPU": num_cpus or 0.01}
        if config.device == "cuda":
            bundle["GPU"] = 1
        self.pg = placement_group([bundle] * tp, strategy="STRICT_PACK")
        ray.get(self.pg.ready(), timeout=300)
        tag = uuid.uuid4().hex[:8]
        actor = ray.remote(TPWorker)
        self.workers = [
            actor.options(
                name=f"clusterft-tp-worker-{tag}-rank{rank}",
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=rank
                ),
            ).remote(rank, tp)
            for rank in range(tp)
        ]
        init_method = ray.get(self.workers[0].rendezvous_address.remote())
        budget = min(self.call("load", init_method, str(model_dir), config))  # every rank must fit
        self.num_gpu_blocks, self.num_cpu_blocks = kv_cache_blocks(config, args, tp, budget)
        self.call("allocate", self.num_gpu_blocks, self.num_cpu_blocks)
        self.lora_manager = WorkerLoRARegistry(self, config.lora_modules)

    def call(self, method: str, *args: Any) -> list[Any]:
        """Every rank's result of `method(*args)`; a dead rank raises at once (the live ones would
        block in their next collective until the gloo timeout)."""
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                rank = refs.index(ready[0])
                raise WorkerDiedError(
                    f"tensor-parallel worker rank {rank} died: {type(exc).__name__}"
                ) from exc
        return ray.get(refs)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        out, *others = self.call("execute_model", so)
        for errors in others:
            for req_id, error in errors.items():
                out.errors.setdefault(req_id, error)
        return out

    def check_health(self) -> None:
        self.call("ping")

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.pg)
