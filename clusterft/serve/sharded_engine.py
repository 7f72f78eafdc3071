"""ShardedLLMEngine: LLMEngine with tensor-parallel worker actors as its executor.

The scheduler, KV cache manager (block ids, prefix cache) and output processor stay here, in the
engine replica; the model and the KV tensors live only in the workers (worker.py's WorkerGroup).
"""

from __future__ import annotations

import functools
from pathlib import Path

from clusterft.engine import EngineConfig, LLMEngine
from clusterft.serve.worker import WorkerGroup


class ShardedLLMEngine(LLMEngine):
    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig,
        tensor_parallel_size: int,
        worker_num_cpus: float = 1.0,
    ) -> None:
        workers = functools.partial(
            WorkerGroup, tensor_parallel_size=tensor_parallel_size, num_cpus=worker_num_cpus
        )
        super().__init__(model_dir, config, executor_factory=workers)
