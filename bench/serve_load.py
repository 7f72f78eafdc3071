"""Load-test the served app over HTTP against the offline engine, same workload, same run.

Workload (fixed seed): N requests of random prompt token ids (length --prompt-len), --max-tokens
greedy output tokens each (ignore_eos, so every request generates exactly that many). Served: C
concurrent streaming clients (closed loop: each sends its next request when the last one ends) over
HTTP to the live app on 127.0.0.1. Offline: the same requests through `LLM.generate` with
`max_num_seqs = C`. The ratio served/offline output-token throughput is the HTTP + Serve overhead.

    python bench/serve_load.py --json                      # 32 streams, 96 requests, small tiny Llama
    python bench/serve_load.py --concurrency 8 --requests 16 --json

TTFT is request sent -> first token chunk; ITL per request is (last chunk - first chunk) / (tokens - 1)
(a chunk may carry several tokens when the client lags: the engine coalesces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clusterft.runtime import apply_runtime_defaults

apply_runtime_defaults()


def make_workload(num_requests: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(7, vocab_size) for _ in range(prompt_len)] for _ in range(num_requests)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_offline(model_dir: Path, engine, prompts: list[list[int]], max_tokens: int, num_threads: int) -> dict:
    import torch

    from clusterft.engine import LLM, SamplingParams

    # The served engine replica gets Ray's OMP_NUM_THREADS = its num_cpus (1): same threads here, or the
    # comparison would measure thread oversubscription on a busy machine instead of serving overhead.
    torch.set_num_threads(num_threads)
    llm = LLM(model_dir, engine.to_engine_config())
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], params)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(prompts) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        "output_tokens": tokens,
    }


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


async def run_clients(
    url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int
) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            try:
                results.append(await one_request(client, url, model, prompt, max_tokens))
            except httpx.HTTPError as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, model, prompts[0], 2)  # warm-up: connections, first step
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] * 1000 for r in ok]
    itl = [r["itl"] * 1000 for r in ok]
    return {
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        "output_tokens": tokens,
        "ttft_ms": {
            "p50": round(percentile(ttft, 50), 1),
            "p99": round(percentile(ttft, 99), 1),
            "mean": round(statistics.fmean(ttft), 1) if ttft else 0.0,
        },
        "itl_ms": {
            "p50": round(percentile(itl, 50), 2),
            "p99": round(percentile(itl, 99), 2),
            "mean": round(statistics.fmean(itl), 2) if itl else 0.0,
        },
        "errors": len(results) - len(ok),
        "error_examples": sorted({r["error"] for r in results if "error" in r})[:3],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="HF model dir (default: a fresh tiny Llama of --size)")
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args()

    from clusterft.hf.tiny import make_tiny_model
    from clusterft.serve.commands import start_app, stop_app
    from clusterft.serve.spec import EngineSettings, ServeSpec

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            Path(args.model_dir) if args.model_dir else make_tiny_model(Path(tmp) / "m", "llama", args.size)
        )
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = make_workload(args.requests, args.prompt_len, vocab, args.seed)
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
            served_model_name="bench",
            port=port,
            engine=engine,
            tensor_parallel_size=args.tensor_parallel_size,
            max_queued_requests=args.requests,
        )
        offline = run_offline(model_dir, engine, prompts, args.max_tokens, max(1, int(spec.engine_num_cpus)))
        url = start_app(spec, log_to_driver=not args.json)
        try:
            served = asyncio.run(run_clients(url, "bench", prompts, args.max_tokens, args.concurrency))
        finally:
            stop_app()
    result = {
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "model_size": args.size if not args.model_dir else "given",
            "tensor_parallel_size": args.tensor_parallel_size,
        },
        "served": served,
        "offline": offline,
        "served_over_offline_throughput": round(
            served["output_tokens_per_s"] / offline["output_tokens_per_s"], 3
        ),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if served["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
