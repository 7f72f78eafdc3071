"""Load-test the served app over HTTP against the offline engine, same workload, same run.

Workload (fixed seed): N requests of random prompt token ids (length --prompt-len), --max-tokens
greedy output tokens each (ignore_eos, so every request generates exactly that many). Served: C
concurrent streaming clients (closed loop: each sends its next request when the last one ends) over
HTTP to the live app on 127.0.0.1. Offline: the same requests through `LLM.generate` with
`max_num_seqs = C`. Both phases warm up on the same extra request (a prompt outside the workload), and
they alternate in --rounds rounds, each round with prompts of its own, identical for both phases (no
prefix is cached at the start of a round in either phase). The ratio served/offline output-token
throughput (the median over rounds; each round's is listed) is the HTTP + Serve overhead. The
machine's 1-minute load average before and after is reported: the phases share its cores.

    python bench/serve_load.py --json                      # 32 streams, 3 x 96 requests, small Llama
    python bench/serve_load.py --concurrency 8 --requests 16 --json
    python bench/serve_load.py --stream-interval 1 --json  # one message per token

TTFT is request sent -> first token chunk; ITL per request is (last chunk - first chunk) / (tokens - 1)
(a chunk carries up to --stream-interval tokens, more when the client lags: the engine coalesces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import result_stream

RESULT = result_stream(sys.argv)  # before torch, DeepSpeed and Ray log anything

from clusterft.runtime import apply_runtime_defaults  # noqa: E402

apply_runtime_defaults()


WARMUP_TOKENS = 2
MODEL = "bench"


def make_workload(num_requests: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(7, vocab_size) for _ in range(prompt_len)] for _ in range(num_requests)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_offline(model_dir: Path, engine, warmup: list[int], num_threads: int):
    """The offline engine, warmed up like the served one."""
    import torch

    from clusterft.engine import LLM, SamplingParams

    # The served engine replica gets Ray's OMP_NUM_THREADS = its num_cpus (1): same threads here, or the
    # comparison would measure thread oversubscription on a busy machine instead of serving overhead.
    torch.set_num_threads(num_threads)
    llm = LLM(model_dir, engine.to_engine_config())
    llm.generate([warmup], SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS, ignore_eos=True))
    return llm


def run_offline(llm, prompts: list[list[int]], max_tokens: int) -> dict:
    from clusterft.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "output_tokens": tokens, "requests": len(prompts)}


async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                last = time.perf_counter()
                first = first or last
    if first is None:
        return {"error": "no tokens"}
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return {"ttft": first - sent, "itl": itl, "tokens": tokens}


async def run_clients(client, url: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    """One round of the served phase: `concurrency` closed-loop streaming clients over `prompts`."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict] = []

    async def client_loop() -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            try:
                results.append(await one_request(client, url, MODEL, prompt, max_tokens))
            except httpx.HTTPError as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    return {
        "wall_s": wall,
        "output_tokens": sum(r["tokens"] for r in ok),
        "requests": len(ok),
        "ttft": [r["ttft"] for r in ok],
        "itl": [r["itl"] for r in ok],
        "errors": sorted(r["error"] for r in results if "error" in r),
    }


def throughput(rounds: list[dict]) -> dict:
    """All rounds of one phase together."""
    wall = sum(r["wall_s"] for r in rounds)
    tokens = sum(r["output_tokens"] for r in rounds)
    return {
        "wall_s": round(wall, 3),
        "requests_per_s": round(sum(r["requests"] for r in rounds) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        "output_tokens": tokens,
    }


def latency_ms(values_s: list[float], digits: int) -> dict:
    ms = [v * 1000 for v in values_s]
    return {
        "p50": round(percentile(ms, 50), digits),
        "p99": round(percentile(ms, 99), digits),
        "mean": round(statistics.fmean(ms), digits) if ms else 0.0,
    }


SERVE_ROLES = {
    "engine": "ray::ServeReplica:clusterft:engine",
    "ingress": "ray::ServeReplica:clusterft:ingress",
    "proxy": "ray::ProxyActor",
}


def serve_processes() -> dict:
    """role -> psutil.Process of the app's engine replica, ingress replica and HTTP proxy (found by
    the process titles Ray gives its actors), and the load client (this process)."""
    import psutil

    found = {"client": psutil.Process()}
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or ())
        for role, prefix in SERVE_ROLES.items():
            if title.startswith(prefix):
                found[role] = process
    missing = set(SERVE_ROLES) - set(found)
    assert not missing, f"no process found for {sorted(missing)}"
    return found


def cpu_seconds(processes: dict) -> dict:
    out = {}
    for role, process in processes.items():
        times = process.cpu_times()
        out[role] = times.user + times.system
    return out


def cpu_per_1k_tokens(before: list[dict], after: list[dict], tokens: int) -> dict:
    """CPU seconds each role spent per 1,000 output tokens, summed over rounds."""
    roles = before[0].keys()
    spent = {role: sum(a[role] - b[role] for b, a in zip(before, after, strict=True)) for role in roles}
    return {role: round(1000 * seconds / tokens, 3) for role, seconds in spent.items()}


async def measure(url: str, llm, workloads: list[list[list[int]]], warmup, max_tokens, concurrency) -> dict:
    """Alternate offline and served rounds (each round its own prompts, the same in both phases), so
    that load from elsewhere on the machine falls on both phases rather than on one of them. CPU
    seconds per process are counted per phase: offline, this process is the engine (nothing else
    runs in it then); served, the engine replica, the ingress, the proxy and this process (the client)."""
    import httpx

    offline, served = [], []
    cpu = {"offline": ([], []), "served": ([], [])}
    processes = serve_processes()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, MODEL, warmup, WARMUP_TOKENS)  # connections, first step
        for prompts in workloads:
            cpu["offline"][0].append(cpu_seconds({"engine": processes["client"]}))
            offline.append(await asyncio.to_thread(run_offline, llm, prompts, max_tokens))
            cpu["offline"][1].append(cpu_seconds({"engine": processes["client"]}))
            cpu["served"][0].append(cpu_seconds(processes))
            served.append(await run_clients(client, url, prompts, max_tokens, concurrency))
            cpu["served"][1].append(cpu_seconds(processes))
    errors = [e for r in served for e in r["errors"]]
    ratios = [
        (s["output_tokens"] / s["wall_s"]) / (o["output_tokens"] / o["wall_s"])
        for s, o in zip(served, offline, strict=True)
    ]
    return {
        "served": {
            **throughput(served),
            "ttft_ms": latency_ms([t for r in served for t in r["ttft"]], 1),
            "itl_ms": latency_ms([t for r in served for t in r["itl"]], 2),
            "errors": len(errors),
            "error_examples": sorted(set(errors))[:3],
        },
        "offline": throughput(offline),
        "cpu_s_per_1k_tokens": {
            phase: cpu_per_1k_tokens(*cpu[phase], sum(r["output_tokens"] for r in rounds))
            for phase, rounds in (("offline", offline), ("served", served))
        },
        "round_ratios": [round(r, 3) for r in ratios],
        "served_over_offline_throughput": round(statistics.median(ratios), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="HF model dir (default: a fresh tiny Llama of --size)")
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3, help="offline/served round pairs")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument(
        "--stream-interval", type=int, default=None, help="the app's stream_interval (default: ServeSpec's)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args()

    from clusterft.hf.tiny import make_tiny_model
    from clusterft.serve.launch import start_app, stop_app
    from clusterft.serve.spec import EngineSettings, ServeSpec

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            Path(args.model_dir) if args.model_dir else make_tiny_model(Path(tmp) / "m", "llama", args.size)
        )
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = make_workload(args.requests * args.rounds + 1, args.prompt_len, vocab, args.seed)
        warmup = prompts.pop()
        workloads = [prompts[r * args.requests : (r + 1) * args.requests] for r in range(args.rounds)]
        engine = EngineSettings(
            max_num_seqs=args.concurrency,
            max_model_len=args.prompt_len + args.max_tokens + 16,
            num_gpu_blocks=args.concurrency * ((args.prompt_len + args.max_tokens) // 16 + 2),
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec = ServeSpec(
            model_dir=str(model_dir),
            served_model_name=MODEL,
            port=port,
            engine=engine,
            tensor_parallel_size=args.tensor_parallel_size,
            max_queued_requests=args.requests,
            **({"stream_interval": args.stream_interval} if args.stream_interval else {}),
        )
        llm = start_offline(model_dir, engine, warmup, max(1, int(spec.engine_num_cpus)))
        load_before = os.getloadavg()[0]
        url = start_app(spec, log_to_driver=not args.json)
        try:
            measured = asyncio.run(measure(url, llm, workloads, warmup, args.max_tokens, args.concurrency))
        finally:
            stop_app()
    result = {
        "workload": {
            "requests": args.requests,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "model_size": args.size if not args.model_dir else "given",
            "tensor_parallel_size": args.tensor_parallel_size,
            "stream_interval": spec.stream_interval,
        },
        **measured,
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result, indent=None if args.json else 2), file=RESULT, flush=True)
    return 0 if measured["served"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
