"""Tensor-parallel shards (heads [h0:h1], MLP slices, sliced LoRA, all-reduce) compute what one worker
computes.

Two ModelRunners in two threads stand in for two worker actors: each holds half of the heads of
every layer and of every KV block, and an all-reduce over a barrier joins their partial sums.
"""

import threading

import pytest

from clusterft.engine import LLM, EngineConfig, SamplingParams
from clusterft.engine.executor import Executor, build_model_runner, kv_cache_blocks, load_worker_model
from clusterft.engine.kv_cache_manager import KVCacheManager
from clusterft.engine.models import ParallelContext
from clusterft.engine.request import Request
from clusterft.engine.scheduler import Scheduler
from tests.engine.helpers import random_prompts


class ThreadAllReduce:
    def __init__(self, world_size: int) -> None:
        self.parts = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def for_rank(self, rank: int):
        def all_reduce(x):
            self.parts[rank] = x
            self.barrier.wait()
            total = sum(self.parts)
            self.barrier.wait()
            return total

        return all_reduce


def shard_runners(model_dir, config, num_gpu_blocks, num_cpu_blocks, tp):
    reduce = ThreadAllReduce(tp)
    contexts = [ParallelContext(r, tp, reduce.for_rank(r)) for r in range(tp)]
    return [
        build_model_runner(
            load_worker_model(model_dir, config, pc), config, num_gpu_blocks, num_cpu_blocks, pc
        )
        for pc in contexts
    ]


def run_shards(runners, sched_out):
    """Every shard's ModelRunnerOutput for one step, each shard in its own thread."""
    results = [None] * len(runners)

    def run(rank):
        results[rank] = runners[rank].execute_model(sched_out)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(runners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class ThreadExecutor(Executor):
    """The engine's executor seam without Ray: two shards in threads, rank 0's tokens returned."""

    def __init__(self, model_dir, config, model_args, tp=2):
        self.num_gpu_blocks, self.num_cpu_blocks = kv_cache_blocks(config, model_args, tp, 2**30)
        self.runners = shard_runners(model_dir, config, self.num_gpu_blocks, self.num_cpu_blocks, tp)
        self.lora_manager = self.runners[0].lora_manager  # names only: every rank has config's adapters

    def execute_model(self, so):
        return run_shards(self.runners, so)[0]

    def check_health(self):
        pass

    def shutdown(self):
        pass


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_shards_generate_what_one_worker_generates(model_dirs, arch):
    tp = 2
    config = EngineConfig()
    [full] = shard_runners(model_dirs[arch], config, 32, 0, 1)
    shards = shard_runners(model_dirs[arch], config, 32, 0, tp)
    kv = KVCacheManager(16, 32)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    for i, prompt in enumerate(random_prompts([5, 40, 23], seed=50)):
        scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=8)))
    steps = 0
    while scheduler.has_unfinished_requests():
        sched_out = scheduler.schedule()
        results = run_shards(shards, sched_out)
        expected = full.execute_model(sched_out)
        for shard_out in results:
            assert shard_out.req_ids == expected.req_ids
            assert shard_out.sampled_token_ids == expected.sampled_token_ids
        scheduler.update_from_output(sched_out, expected)
        steps += 1
    assert steps >= 9  # prefill chunks then decodes
    assert shards[0].cache_engine.gpu_cache[0][0].shape[1] == full.cache_engine.gpu_cache[0][0].shape[1] // tp


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_engine_on_two_shards_equals_one_process(llama_dir, adapters, mode):
    """Preemption, prefix-cache hits and a sliced LoRA adapter through LLMEngine's executor seam."""
    config = EngineConfig(
        num_gpu_blocks=12,
        num_cpu_blocks=16,
        preemption_mode=mode,
        lora_modules=(("a", str(adapters["a"][0])),),
    )
    prompts = random_prompts([40, 42, 44, 46], seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    local, sharded = LLM(llama_dir, config), LLM(llama_dir, config, executor_factory=ThreadExecutor)
    for llm in (local, sharded):
        base = llm.generate(prompts, params)
        ada = llm.generate(prompts[:2], params, lora_name="a")
        again = llm.generate(prompts[1:2], params, lora_name="a")  # its prompt's blocks are cached
        llm.tokens = [o.outputs[0].token_ids for o in base + ada + again]
    assert sharded.tokens == local.tokens
    assert sharded.tokens[4] != sharded.tokens[0]  # the adapter changes the output
    assert again[0].num_cached_tokens == 32
    assert getattr(sharded.engine.get_stats(), f"num_preemptions_{mode}") > 0
    assert sharded.engine.kv_cache_manager.block_pool.num_used_blocks == 0
    assert sharded.engine.num_gpu_blocks == local.engine.num_gpu_blocks == 12
