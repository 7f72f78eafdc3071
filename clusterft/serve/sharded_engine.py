"""ShardedLLMEngine: the engine's LLMEngine with the model runner replaced by tensor-parallel workers.

The scheduler, KV cache manager (block ids, prefix cache) and output processor stay here, in the
engine replica; the model and the KV tensors live only in the workers. LLMEngine.__init__ loads the
whole model in-process, which a sharded engine must not do, so this sets up the same fields itself
and reuses LLMEngine's add_request / step / abort_request / get_stats unchanged.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from clusterft.engine import EngineConfig, LLMEngine
from clusterft.engine.cache_engine import CacheEngine
from clusterft.engine.kv_cache_manager import KVCacheManager
from clusterft.engine.llm_engine import _DTYPES, _eos_token_ids
from clusterft.engine.models import ModelArgs
from clusterft.engine.output_processor import OutputProcessor
from clusterft.engine.scheduler import Scheduler
from clusterft.errors import UserError
from clusterft.serve.worker import WorkerGroup


class WorkerLoRARegistry:
    """What the engine's add_request needs of a LoRA manager (`paths`), forwarding to the workers."""

    def __init__(self, workers: WorkerGroup) -> None:
        self.workers = workers
        self.paths: dict[str, Path] = {}

    def add_lora(self, name: str, path: str | Path) -> None:
        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"LoRA {name!r}: {path} has no adapter_config.json (save it with peft)")
        self.workers.add_lora(name, str(path))
        self.paths[name] = path

    def remove_lora(self, name: str) -> None:
        self.workers.remove_lora(name)
        self.paths.pop(name, None)


class ShardedLLMEngine(LLMEngine):
    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig,
        tensor_parallel_size: int,
        worker_num_cpus: float = 1.0,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.config = config
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.model_args = args = ModelArgs.from_hf_config(hf_config)
        tp = tensor_parallel_size
        if args.num_heads % tp or args.num_kv_heads % tp or args.intermediate_size % tp:
            raise UserError(
                f"tensor_parallel_size {tp} must divide the model's attention heads ({args.num_heads}), "
                f"KV heads ({args.num_kv_heads}) and intermediate_size ({args.intermediate_size})"
            )
        self.max_model_len = config.max_model_len or args.max_position_embeddings
        self.eos_token_ids = _eos_token_ids(self.model_dir, hf_config, self.tokenizer)
        # Each worker holds 1/tp of every block, so a per-worker budget holds tp times the blocks.
        block_bytes = CacheEngine.block_bytes(
            args.num_layers, args.num_kv_heads // tp, args.head_dim, config.block_size, _DTYPES[config.dtype]
        )
        self.num_gpu_blocks = config.num_gpu_blocks or max(
            int(config.kv_cache_space * 2**30) // block_bytes, 1
        )
        self.num_cpu_blocks = (
            config.num_cpu_blocks
            if config.num_cpu_blocks is not None
            else int(config.swap_space * 2**30) // block_bytes
        )
        self.kv_cache_manager = KVCacheManager(
            config.block_size, self.num_gpu_blocks, self.num_cpu_blocks, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            preemption_mode=config.preemption_mode,
            max_loras=config.max_loras,
        )
        self.workers = WorkerGroup(
            str(self.model_dir), config, tp, worker_num_cpus, self.num_gpu_blocks, self.num_cpu_blocks
        )
        self.model_runner = self.workers  # execute_model(SchedulerOutput) -> rank 0's ModelRunnerOutput
        self.lora_manager = WorkerLoRARegistry(self.workers)
        self.lora_manager.paths = {
            name: Path(path) for name, path in config.lora_modules
        }  # workers have them
        self.output_processor = OutputProcessor(self.tokenizer)
        self._pending_outputs: list[str] = []
        self._request_counter = itertools.count()
        self.num_steps = 0
        self._peak_blocks = 0
        self._kv_utilization_at_peak = 0.0

    def remove_lora(self, name: str) -> None:
        self.lora_manager.remove_lora(name)

    def check_health(self) -> None:
        self.workers.check_health()

    def shutdown(self) -> None:
        self.workers.shutdown()
