"""Checkpoint save/restore cost per rank: peak host RSS during a save, bytes written, seconds.

Two gloo processes (no Ray: the save itself is measured, not the scheduling around it) each build
the same randomly initialised llama, take one full fine-tuning step under DeepSpeed (ddp or ZeRO
1/2/3, fp32 AdamW on CPU), then save a bundle exactly as the training recipe does and restore it.
`--source DIR` runs the clusterft found in DIR instead (e.g. a worktree of an older commit): with
its `gather_state` (every rank all-reduces the full weights and moments, rank 0 writes them) the
"before" figures come from the very code that shipped.

The ZeRO shares (Ψ trainable parameters, N ranks, fp32 on CPU: the "fp16" parameters are the fp32
module weights and DeepSpeed still keeps its own fp32 master partitions):
    held per rank:  ddp 4Ψ + 8Ψ (no master copy) · ZeRO-1/2 4Ψ + 12Ψ/N · ZeRO-3 16Ψ/N
    saved per rank: the optimizer states a rank owns, 12Ψ/N (master 4Ψ/N + moments 8Ψ/N); ddp
                    ranks hold replicas and each writes a 1/N slice of them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STAGES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


class PeakRss(threading.Thread):
    """Samples this process's resident set every 2 ms; `peak` is the highest seen since start."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_bytes()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, rss_bytes())


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_engine(shape: dict[str, int], stage: int):
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"], vocab_size=shape["vocab"], tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    psi = sum(p.numel() for _, p in named)  # before ZeRO-3 partitions them (numel 0 after)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": zero,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for _, p in named], config=ds_config
    )
    ids = torch.randint(0, shape["vocab"], (1, 32))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    return engine, named, psi, model


def measure_rank(rank: int, strategy: str, shape: dict[str, int], bundle_root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    engine, named, psi, _ = build_engine(shape, STAGES[strategy])
    from clusterft.storage import BundleStore
    from clusterft.train import checkpointing, state

    store = BundleStore(bundle_root)
    trainer = {"global_step": 1} if rank == 0 else None
    rng = state.rng_state()
    sharded = hasattr(state, "shard_state")
    dist.barrier()
    before = rss_bytes()
    sampler = PeakRss()
    sampler.start()
    started = time.perf_counter()
    if sharded:
        shard = state.shard_state(engine, state.layout(engine, named, rank, 2))
        checkpointing.save_bundle(
            store, 1, rank=rank, shard=shard, trainer=trainer, rng=rng, meta={}, keep_last=1
        )
        del shard
    else:  # the code before sharded checkpoints
        full = state.gather_state(engine, named)
        part = (0, full) if rank == 0 else None
        checkpointing.save_bundle(
            store, 1, rank=rank, state_part=part, trainer=trainer, rng=rng, meta={}, keep_last=1
        )
        del full, part
    save_s = time.perf_counter() - started
    peak = sampler.stop()
    dist.barrier()
    name = store.find_latest_valid().name
    files = dict((rel, size) for rel, size, _ in store.storage.walk_files(name))
    mine = [
        rel
        for rel in files
        if f"rank-{rank}." in rel or (rank == 0 and ("part-" in rel or rel == "trainer.pt"))
    ]
    started = time.perf_counter()
    if sharded:
        bundle = checkpointing.load_bundle(store, name, rank)
        state.restore_moments(engine, state.layout(engine, named, rank, 2), checkpointing.read_shards(bundle))
    else:
        bundle = checkpointing.load_bundle(store, name, rank)
        state.restore_optimizer_state(engine, named, bundle.state)
    restore_s = time.perf_counter() - started
    result = {
        "rank": rank,
        "parameters": psi,
        "rss_before_save_bytes": before,
        "peak_extra_during_save_bytes": peak - before,
        "bytes_written": sum(files[rel] for rel in mine),
        "save_s": round(save_s, 3),
        "restore_optimizer_s": round(restore_s, 3),
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank: int, strategy: str, shape: dict[str, int], bundle_root: str, out: str, source: str) -> None:
    sys.path.insert(0, source)
    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_RANK=str(rank))
    measure_rank(rank, strategy, shape, bundle_root, out)


def measure(strategy: str, shape: dict[str, int], source: str, port: int) -> dict[str, Any]:
    """Both ranks' figures for one strategy, next to its ZeRO shares."""
    import torch.multiprocessing as mp

    os.environ["MASTER_PORT"] = str(port)
    with tempfile.TemporaryDirectory(prefix="cft-ckmem") as work:
        mp.spawn(_worker, args=(strategy, shape, f"{work}/bundles", work, source), nprocs=2, join=True)
        ranks = [json.loads(Path(work, f"rank-{r}.json").read_text()) for r in range(2)]
    psi, n = ranks[0]["parameters"], 2
    stage = STAGES[strategy]
    held = {0: 12 * psi, 1: 4 * psi + 12 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}[stage]
    share = 12 * psi / n
    for r in ranks:
        r["bytes_written_over_share"] = round(r["bytes_written"] / share, 3)
        r["peak_extra_over_share"] = round(r["peak_extra_during_save_bytes"] / share, 3)
    return {"held_per_rank_formula_bytes": held, "saved_share_per_rank_bytes": share, "ranks": ranks}
