"""Data benchmark: tokenization seconds and per-worker dataset memory for a generated alpaca dataset
(200,000 examples by default), with 1 and 2 worker processes each reading its shard of one epoch.

before (a tree without the cache, e.g. `git worktree add /tmp/base_c adc71f5`): every worker, and
the driver's preflight before them, tokenizes the whole dataset into Python lists.
after (this tree): the driver tokenizes once into the Arrow cache; each worker memory-maps it and
reads only the rows of its own batches.

Per worker: seconds to get its dataset (tokenize or open), and /proc/self/status deltas from just
before that to after its epoch: RssAnon (private memory: the dataset's real cost), RssFile (pages of
the memory-mapped cache, shared with the page cache and every other worker) and VmHWM (peak RSS).

    python bench/data.py --json --base-tree /tmp/base_c      # before and after, one JSON object
    python bench/data.py --examples 20000                     # after only, smaller
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

WORDS = [
    "reverse",
    "sort",
    "count",
    "repeat",
    "shift",
    "rotate",
    "the",
    "digits",
    "of",
    "this",
    "number",
    "please",
    "quickly",
    "now",
]
MICRO_BATCH = 8
CUTOFF_LEN = 128


def write_dataset(directory: Path, count: int) -> None:
    """`count` alpaca records (JSON Lines), deterministic: a few words of instruction, digits, answer."""
    rng = random.Random(0)
    with open(directory / "bench.jsonl", "w") as handle:
        for _ in range(count):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 24)))
            instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            record = {"instruction": instruction, "input": digits, "output": digits[::-1]}
            handle.write(json.dumps(record) + "\n")
    (directory / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.jsonl"}}))


def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def worker(args: argparse.Namespace) -> None:
    """One worker: get the dataset (tokenize, or open the cache), read its shard of epoch 0."""
    sys.path.insert(0, args.tree)
    from transformers import AutoTokenizer

    from clusterft.config.spec import DataArgs
    from clusterft.data import EpochBatchSampler, build_datasets

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    data = DataArgs(
        dataset=["bench"], dataset_dir=args.dataset_dir, template="default", cutoff_len=CUTOFF_LEN
    )
    cache = {"default_cache_dir": args.cache_dir} if args.cache_dir else {}
    before = _status()
    started = time.perf_counter()
    train = build_datasets(data, tokenizer, seed=0, **cache).train
    load_seconds = time.perf_counter() - started
    sampler = EpochBatchSampler(
        len(train), micro_batch_size=MICRO_BATCH, world_size=args.world, rank=args.rank, seed=0
    )
    started = time.perf_counter()
    rows = tokens = 0
    for micro_step in range(sampler.micro_steps_per_epoch()):
        for index in sampler.batch(0, micro_step):
            tokens += len(train[index].input_ids)
            rows += 1
    epoch_seconds = time.perf_counter() - started
    after = _status()
    result = {
        "rank": args.rank,
        "load_seconds": round(load_seconds, 2),
        "epoch_read_seconds": round(epoch_seconds, 2),
        "rows_read": rows,
        "tokens_read": tokens,
        "dataset_rss_anon_mib": round(after["RssAnon"] - before["RssAnon"], 1),
        "dataset_rss_file_mib": round(after["RssFile"] - before["RssFile"], 1),
        "peak_rss_mib": round(after["VmHWM"], 1),
        "rss_before_mib": round(before["VmRSS"], 1),
    }
    print(json.dumps(result))


def _spawn(tree: str, model_dir: Path, dataset_dir: Path, cache_dir: Path | None, rank: int, world: int):
    command = [sys.executable, __file__, "--worker", "--tree", tree, "--model-dir", str(model_dir),
               "--dataset-dir", str(dataset_dir), "--rank", str(rank), "--world", str(world)]  # fmt: skip
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def run_workers(
    tree: str, model_dir: Path, dataset_dir: Path, cache_dir: Path | None, world: int
) -> list[dict]:
    """`world` workers at once; each prints one JSON line."""
    procs = [_spawn(tree, model_dir, dataset_dir, cache_dir, rank, world) for rank in range(world)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker failed with exit code {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def measure(tree: str, model_dir: Path, dataset_dir: Path, cached: bool, scratch: Path) -> dict[str, Any]:
    """The driver's preflight (one tokenization), then 1 and 2 workers."""
    cache_dir = scratch / f"cache-{int(cached)}" if cached else None
    (driver,) = run_workers(tree, model_dir, dataset_dir, cache_dir, 1)
    out: dict[str, Any] = {"driver_tokenize_seconds": driver["load_seconds"]}
    for world in (1, 2):
        workers = run_workers(tree, model_dir, dataset_dir, cache_dir, world)
        out[f"workers_{world}"] = workers
        out[f"tokenizations_{world}_workers"] = 1 + (0 if cached else world)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--base-tree", help="a checkout without the cache (the 'before' column)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--tree", "--model-dir", "--dataset-dir", "--cache-dir"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT))
    from bench.common import result_stream

    out = result_stream(sys.argv)
    from clusterft.hf.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch_name:
        scratch = Path(scratch_name)
        model_dir = make_tiny_model(scratch / "model", "llama", "tiny")
        dataset_dir = scratch / "data"
        dataset_dir.mkdir()
        write_dataset(dataset_dir, args.examples)
        result: dict[str, Any] = {
            "examples": args.examples,
            "dataset_bytes": (dataset_dir / "bench.jsonl").stat().st_size,
            "cutoff_len": CUTOFF_LEN,
            "micro_batch_size": MICRO_BATCH,
            "cpus": os.cpu_count(),
        }
        if args.base_tree:
            result["before"] = measure(args.base_tree, model_dir, dataset_dir, False, scratch)
        result["after"] = measure(str(ROOT), model_dir, dataset_dir, True, scratch)
        cache_files = list((scratch / "cache-1").rglob("train.arrow"))
        result["after"]["cache_train_arrow_bytes"] = cache_files[0].stat().st_size
    print(json.dumps(result, indent=1), file=out)


if __name__ == "__main__":
    main()
