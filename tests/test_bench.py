"""The three benchmarks `make bench` runs, and bench/store.py, each as a real subprocess at the
smallest size its CLI allows, so that they cannot rot unnoticed: each must exit 0, print the JSON
keys README.md quotes, and report values that are sane and honest (outputs that match, token counts
that add up, losses that agree). No speed target is asserted: targets are the benchmarks' business,
and CI machines differ.

Every subprocess runs with a marker in its environment, which every process it starts inherits
(Ray's GCS, raylet and workers included); once it has exited, no process carrying the marker may
be left. The scripts start their own local Ray cluster (`ray.init` with no address), whose ports
are all picked free by Ray, and serve_load's HTTP port is a free one: no default port is taken.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MARKER = "CLUSTERFT_BENCH_TEST_RUN"


def marked_pids(token: str) -> list[int]:
    """Processes whose environment carries MARKER=token: the benchmark's process and its descendants."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def run_bench(
    script: str, *args: str, timeout_s: float = 300, ray_tmpdir: str | None = None
) -> tuple[Any, str]:
    """Run bench/<script> --json; returns (the JSON it printed, its whole stdout). Fails if it
    exits non-zero or leaves any process behind it (a Ray cluster) 30 s after it exits."""
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own, never someone's
    env[MARKER] = token
    if ray_tmpdir:
        env["RAY_TMPDIR"] = ray_tmpdir
    command = [sys.executable, str(ROOT / "bench" / script), "--json", *args]
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        deadline = time.monotonic() + 30
        while (left := marked_pids(token)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"{script} left processes running: {left}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # a failed or timed-out run's leftovers
            for pid in marked_pids(token):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.5)
    # With --json, stdout is the JSON alone (bench/common.py sends every log line to stderr), so
    # `bench/X.py --json | jq` works.
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"{script} --json stdout is not one JSON line:\n{proc.stdout[-4000:]}"
    return json.loads(lines[0]), proc.stdout


def positive(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def test_engine_bench():
    """bench/engine.py --quick with 4 requests (HF batch sizes 1 and 16, prefix TTFT, int8 report)."""
    result, _ = run_bench("engine.py", "--quick", "--num-requests", "4", timeout_s=240)
    assert result["num_requests"] == 4
    # README's engine table: speedup_vs_hf, per CPU-second, kv_utilization, prefix_ttft_ratio,
    # greedy_match_hf (n/n), int8 memory saved / perplexity / greedy agreement.
    assert result["greedy_match_hf"] is True
    assert result["greedy_match_hf_requests"] == 4
    for key in (
        "engine_tokens_per_s",
        "hf_tokens_per_s",
        "speedup_vs_hf",
        "engine_tokens_per_cpu_s",
        "hf_tokens_per_cpu_s",
        "speedup_vs_hf_cpu",
        "prefix_ttft_cold_s",
        "prefix_ttft_warm_s",
        "prefix_ttft_ratio",
        "total_output_tokens",
    ):
        assert positive(result[key]), (key, result[key])
    # The baseline is HF at its best batch size, and the speedups are the ratios they claim to be.
    by_size = result["hf_tokens_per_s_by_batch_size"]
    assert set(by_size) == {"1", "16"}
    assert result["hf_tokens_per_s"] == max(by_size.values()) == by_size[str(result["hf_best_batch_size"])]
    assert result["hf_tokens_per_cpu_s"] == max(result["hf_tokens_per_cpu_s_by_batch_size"].values())
    ratio = result["engine_tokens_per_s"] / result["hf_tokens_per_s"]
    assert result["speedup_vs_hf"] == pytest.approx(ratio, rel=0.02, abs=0.01)
    cpu_ratio = result["engine_tokens_per_cpu_s"] / result["hf_tokens_per_cpu_s"]
    assert result["speedup_vs_hf_cpu"] == pytest.approx(cpu_ratio, rel=0.02, abs=0.01)
    ttft_ratio = result["prefix_ttft_cold_s"] / result["prefix_ttft_warm_s"]
    assert result["prefix_ttft_ratio"] == pytest.approx(ttft_ratio, rel=0.05)
    assert 0 < result["kv_utilization"] <= 1
    int8 = result["int8"]
    assert 0 < int8["weight_memory_saved"] < 1
    assert int8["int8_weight_bytes"] < int8["fp32_weight_bytes"]
    assert positive(int8["fp32_perplexity"]) and positive(int8["int8_perplexity"])
    assert 0 <= int8["greedy_token_agreement"] <= 1


def test_train_bench():
    """bench/train.py with DDP and ZeRO-3 only, 2 steps, no kill → resume (each strategy starts its
    own Ray Train worker group and DeepSpeed engine, ~20 s; the full six plus the kill take minutes).
    2 steps is the fewest that compares anything: step 1's loss comes before any optimizer update."""
    result, _ = run_bench("train.py", "--steps", "2", "--strategies", "ddp,zero3", "--no-kill", timeout_s=300)
    assert result["steps"] == 2 and result["workers"] == 2
    assert positive(result["parameters"])
    strategies = result["strategies"]
    assert set(strategies) == {"ddp", "zero3"}
    assert "kill_resume_zero2" not in result
    for name, s in strategies.items():
        # README's training table: tokens/s, peak MB, model-state bytes measured / ZeRO formula (fp32).
        assert s["status"] == "succeeded", (name, s)
        assert s["steps"] == 2, (name, s)
        assert positive(s["tokens_per_s_per_worker"]), (name, s)
        assert positive(s["peak_memory_mb_per_worker"]), (name, s)
        assert positive(s["final_loss"]), (name, s)
        measured, expected = s["model_state_bytes_measured"], s["model_state_bytes_expected"]
        assert measured["total"] == measured["params"] + measured["master"] + measured["moments"]
        assert measured["total"] == pytest.approx(expected["fp32"], rel=0.01), name
        assert s["checkpoint_save_s"] and all(positive(t) for t in s["checkpoint_save_s"]), (name, s)
        assert positive(s["checkpoint_bytes"]), (name, s)
    # The script sets no tolerance of its own. Measured, the two agree to the last bit; rel 1e-4 is
    # far below what step 1's update moves the loss by (6.91 -> 6.05), so a ZeRO update that
    # differs from DDP's still fails.
    assert strategies["zero3"]["final_loss"] == pytest.approx(strategies["ddp"]["final_loss"], rel=1e-4)
    # ZeRO-3 partitions parameters, master copy and moments over the 2 workers: 8Ψ bytes each vs DDP's 12Ψ.
    assert (
        strategies["zero3"]["model_state_bytes_measured"]["total"]
        < strategies["ddp"]["model_state_bytes_measured"]["total"]
    )


def test_checkpoint_memory_bench():
    """bench/train.py --checkpoint-memory --quick (this checkout only, a tiny llama): every rank of
    ddp and ZeRO 1/2/3 writes its own share of the checkpoint. The code before sharded checkpoints
    wrote 2.05x the share on rank 0 and 0.03x on rank 1 here, which fails the 10 % band. Peak memory
    is reported, not asserted: at a 0.7 MB share the allocator's noise is larger than the save."""
    result, _ = run_bench("train.py", "--checkpoint-memory", "--quick", timeout_s=600)
    assert result["model"] == "quick" and result["workers"] == 2
    assert set(result["sources"]) == {"after"} and "before" not in result
    assert result["sources"]["after"]["path"] == str(ROOT)
    assert set(result["after"]) == {"ddp", "zero1", "zero2", "zero3"}
    for name, s in result["after"].items():
        ranks = s["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1], name
        psi = ranks[0]["parameters"]
        assert positive(psi) and ranks[1]["parameters"] == psi, name
        # README's checkpoint table: the share 12Ψ/N, the states held per the fp32 formula, the paper's.
        assert s["saved_share_per_rank_bytes"] == pytest.approx(12 * psi / 2), name
        assert s["held_per_rank_formula_bytes"] == pytest.approx(s["zero_formula_bytes"]["fp32"]), name
        assert positive(s["zero_formula_bytes"]["paper_mixed_precision"]), name
        for r in ranks:
            assert r["bytes_written_over_share"] == pytest.approx(
                r["bytes_written"] / s["saved_share_per_rank_bytes"], abs=1e-3
            ), (name, r)
            assert abs(r["bytes_written_over_share"] - 1) <= 0.10, (name, r)
            assert r["peak_extra_during_save_bytes"] >= 0, (name, r)
            # Rounded to the millisecond: a tiny restore may read 0.0.
            assert r["save_s"] >= 0 and r["restore_optimizer_s"] >= 0, (name, r)
        assert s["bytes_written_within_10pct_of_share"] is True, name
        assert s["peak_extra_within_1_25x_share"] == all(r["peak_extra_over_share"] <= 1.25 for r in ranks)


def test_serve_load_bench():
    """bench/serve_load.py on the tiny Llama: 4 streaming clients, 1 round of 8 requests of 16 prompt
    and 8 output tokens, through the offline engine and then over HTTP to a live Serve app whose
    engine runs in a child process (--engine-process: its CPU is a role of its own)."""
    ray_tmpdir = tempfile.mkdtemp(prefix="cftbs", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        result, _ = run_bench(
            "serve_load.py",
            *("--size", "tiny", "--concurrency", "4", "--requests", "8", "--rounds", "1"),
            *("--prompt-len", "16", "--max-tokens", "8", "--engine-process"),
            timeout_s=240,
            ray_tmpdir=ray_tmpdir,
        )
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    workload = result["workload"]
    assert (workload["requests"], workload["rounds"], workload["concurrency"]) == (8, 1, 4)
    served, offline = result["served"], result["offline"]
    assert served["errors"] == 0, served["error_examples"]
    # ignore_eos: every request generates exactly max_tokens, in both phases.
    assert served["output_tokens"] == offline["output_tokens"] == 8 * 8
    assert positive(served["output_tokens_per_s"]) and positive(offline["output_tokens_per_s"])
    assert positive(served["ttft_ms"]["p50"]) and positive(served["itl_ms"]["p50"])
    assert len(result["round_ratios"]) == 1
    ratio = served["output_tokens_per_s"] / offline["output_tokens_per_s"]
    assert result["served_over_offline_throughput"] == pytest.approx(ratio, rel=0.02, abs=0.002)
    # Engine steps: offline, 2 full waves of 4 requests x 8 tokens (one prefill step + 7 decodes each);
    # served, at least as many (a wave that arrives over several steps takes more of them), counted
    # from the app's /metrics.
    steps = result["engine_steps"]
    assert steps["offline"] == [16]
    assert len(steps["served"]) == 1 and steps["served"][0] >= 16
    assert result["output_tokens_per_step"]["offline"] == 4.0
    assert result["output_tokens_per_step"]["served"] == round(64 / steps["served"][0], 2)
    # README's CPU seconds per 1,000 output tokens: the offline engine; served engine replica, its
    # engine core, ingress, HTTP proxy and load client.
    cpu = result["cpu_s_per_1k_tokens"]
    assert set(cpu["offline"]) == {"engine"}
    assert set(cpu["served"]) == {"engine", "engine_core", "ingress", "proxy", "client"}
    assert positive(cpu["offline"]["engine"]) and positive(cpu["served"]["engine_core"])
    assert all(v >= 0 for v in cpu["served"].values())


def test_store_bench():
    """bench/store.py with 2 processes and 5 jobs each, on SQLite and on the PostgreSQL server it
    starts (and must stop: no process left)."""
    result, _ = run_bench("store.py", "--processes", "2", "--jobs", "5", timeout_s=120)
    assert (result["processes"], result["jobs_per_process"]) == (2, 5)
    for backend in ("sqlite", "postgresql"):
        figures = result[backend]
        assert positive(figures["ops_per_s"]), backend
        for op in ("submit_ms", "transition_ms"):
            assert 0 < figures[op]["p50"] <= figures[op]["p99"], (backend, op)
        assert figures["race"]["jobs"] == 5 and positive(figures["race"]["attempts_per_s"])
    assert result["postgresql"]["server"].startswith("PostgreSQL ")
