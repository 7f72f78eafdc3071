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
from clusterft.engine.cache_engine import CacheEngine
from clusterft.engine.lora import LoRAManager
from clusterft.engine.model_runner import ModelRunner
from clusterft.engine.models import ParallelContext, load_model
from clusterft.engine.outputs import ModelRunnerOutput, SchedulerOutput
from clusterft.engine.sampler import Sampler

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ROW_PARALLEL = ("o_proj", "down_proj")  # their input dim is split; the all-reduce sums the parts


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone; the step it was in cannot complete."""


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


class ShardedLoRAManager(LoRAManager):
    """The engine's LoRAManager, with each adapter sliced like the weights it adapts: B rows for
    column-parallel projections, A columns for row-parallel ones (whose deltas the all-reduce sums)."""

    def __init__(self, model, max_loras: int, device, dtype, rank: int, world_size: int) -> None:
        super().__init__(model, max_loras, device, dtype)
        self.rank, self.world_size = rank, world_size

    def _load(self, path: Path, slot: int) -> None:
        super()._load(path, slot)
        r, n = self.rank, self.world_size
        for module in self._modules():
            entries = module.loras.get(slot)
            if not entries:
                continue
            row_parallel = any(name in module.offsets for name in _ROW_PARALLEL)
            sliced = []
            for a, b, scale, start, end in entries:
                if row_parallel:
                    per = a.shape[1] // n
                    a = a[:, r * per : (r + 1) * per].contiguous()
                else:
                    per = b.shape[0] // n
                    b = b[r * per : (r + 1) * per].contiguous()
                sliced.append((a, b, scale, start, end))
            module.loras[slot] = sliced


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

    def setup(
        self, init_method: str, model_dir: str, config: EngineConfig, num_gpu_blocks: int, num_cpu_blocks: int
    ) -> bool:
        backend = "nccl" if config.device == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=120)
        dist.init_process_group(
            backend, init_method=init_method, rank=self.rank, world_size=self.world_size, timeout=timeout
        )
        dtype = _DTYPES[config.dtype]
        pc = ParallelContext(self.rank, self.world_size, _all_reduce)
        model, args, _ = load_model(
            model_dir,
            dtype=dtype,
            max_model_len=config.max_model_len,
            pc=pc,
            quant_group_size=config.quant_group_size if config.quantization == "int8" else None,
            quant_exclude_modules=config.quant_exclude_modules,
        )
        model = model.to(config.device)
        cache = CacheEngine(
            args.num_layers,
            args.num_kv_heads // self.world_size,
            args.head_dim,
            config.block_size,
            num_gpu_blocks,
            num_cpu_blocks,
            dtype,
            config.device,
        )
        device = torch.device(config.device)
        self.lora = ShardedLoRAManager(model, config.max_loras, device, dtype, self.rank, self.world_size)
        for name, path in config.lora_modules:
            self.lora.add_lora(name, path)
        self.runner = ModelRunner(model, cache, config.block_size, Sampler(config.seed), self.lora)
        return True

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        out = self.runner.execute_model(so)
        if self.world_size > 1 and out.req_ids:
            sampled = torch.tensor([-1 if t is None else t for t in out.sampled_token_ids], dtype=torch.long)
            dist.broadcast(sampled, src=0)
            if self.rank:
                for req_id, token_id in zip(out.req_ids, sampled.tolist(), strict=True):
                    if token_id >= 0:
                        self.runner.requests[req_id].token_ids[-1] = token_id
        return out if self.rank == 0 else None

    def add_lora(self, name: str, path: str) -> None:
        self.lora.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        from clusterft.serve.engine_deployment import unregister_lora

        unregister_lora(self.lora, name)

    def ping(self) -> bool:
        return True


class WorkerGroup:
    """The replica's workers: a placement group with one bundle per rank, and the step fan-out."""

    def __init__(
        self,
        model_dir: str,
        config: EngineConfig,
        world_size: int,
        num_cpus: float,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
    ) -> None:
        bundle: dict[str, float] = {"CPU": num_cpus or 0.01}
        if config.device == "cuda":
            bundle["GPU"] = 1
        self.pg = placement_group([bundle] * world_size, strategy="STRICT_PACK")
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
            ).remote(rank, world_size)
            for rank in range(world_size)
        ]
        init_method = ray.get(self.workers[0].rendezvous_address.remote())
        args = (init_method, model_dir, config, num_gpu_blocks, num_cpu_blocks)
        self._wait([w.setup.remote(*args) for w in self.workers])

    def _wait(self, refs: list) -> list[Any]:
        """Results of one call on every rank; a dead rank raises at once (the live ones would block in
        their next collective until the gloo timeout)."""
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
        return self._wait([w.execute_model.remote(so) for w in self.workers])[0]

    def add_lora(self, name: str, path: str) -> None:
        self._wait([w.add_lora.remote(name, path) for w in self.workers])

    def remove_lora(self, name: str) -> None:
        self._wait([w.remove_lora.remote(name) for w in self.workers])

    def check_health(self) -> None:
        self._wait([w.ping.remote() for w in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.pg)
