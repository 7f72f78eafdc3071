"""Tensor-parallel shards (heads [h0:h1], MLP slices, all-reduce) compute what one worker computes.

Two ModelRunners in two threads stand in for two worker actors: each holds half of the heads of
every layer and of every KV block, and an all-reduce over a barrier joins their partial sums.
"""

import threading

import pytest
import torch

from clusterft.engine.cache_engine import CacheEngine
from clusterft.engine.kv_cache_manager import KVCacheManager
from clusterft.engine.model_runner import ModelRunner
from clusterft.engine.models import ParallelContext, load_model
from clusterft.engine.request import Request
from clusterft.engine.sampler import Sampler
from clusterft.engine.sampling_params import SamplingParams
from clusterft.engine.scheduler import Scheduler
from tests.engine.helpers import random_prompts


class ThreadAllReduce:
    def __init__(self, world_size: int) -> None:
        self.parts: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def for_rank(self, rank: int):
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = x
            self.barrier.wait()
            total = sum(self.parts)
            self.barrier.wait()
            return total

        return all_reduce


def make_runner(model_dir, pc, num_blocks):
    model, args, _ = load_model(model_dir, pc=pc)
    kvh = args.num_kv_heads // pc.tp_size
    cache = CacheEngine(args.num_layers, kvh, args.head_dim, 16, num_blocks, 0, torch.float32, "cpu")
    return ModelRunner(model, cache, 16, Sampler(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_shards_generate_what_one_worker_generates(model_dirs, arch):
    tp = 2
    reduce = ThreadAllReduce(tp)
    full = make_runner(model_dirs[arch], ParallelContext(), 32)
    shards = [
        make_runner(model_dirs[arch], ParallelContext(r, tp, reduce.for_rank(r)), 32) for r in range(tp)
    ]
    kv = KVCacheManager(16, 32)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    for i, prompt in enumerate(random_prompts([5, 40, 23], seed=50)):
        scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=8)))
    steps = 0
    while scheduler.has_unfinished_requests():
        sched_out = scheduler.schedule()
        results = [None] * tp

        def run(rank, sched_out=sched_out, results=results):
            results[rank] = shards[rank].execute_model(sched_out)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = full.execute_model(sched_out)
        for shard_out in results:
            assert shard_out.req_ids == expected.req_ids
            assert shard_out.sampled_token_ids == expected.sampled_token_ids
        scheduler.update_from_output(sched_out, expected)
        steps += 1
    assert steps >= 9  # prefill chunks then decodes
    assert shards[0].cache_engine.gpu_cache[0][0].shape[1] == full.cache_engine.gpu_cache[0][0].shape[1] // tp
