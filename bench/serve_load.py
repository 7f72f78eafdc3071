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

Four side-by-side comparisons, each in one run:

    python bench/serve_load.py --compare routing --json     # prefix-aware router vs Serve's pow2
    python bench/serve_load.py --compare data-plane --json  # Serve's default / throughput-optimised / HAProxy
    python bench/serve_load.py --compare ingress --json     # separate vs direct ingress, x default / HAProxy
    python bench/serve_load.py --compare engine-process --json  # engine in the replica vs in a child

routing: --replicas engine replicas (2), a workload of --system-prompts (8) system prompts of
--prompt-len tokens, each followed by --users different user turns of 16 tokens, shuffled; the app is
deployed afresh per router (cold prefix caches), the routers alternate over --rounds rounds. Reported
per router: the engines' prefix-cache hit rate (tokens found cached / looked up, from /metrics) and
TTFT p50/p99. data-plane: the whole default measurement above, once per data plane, each in a child
process that starts its own Ray cluster with that plane's flags (ServeSpec.data_plane); the planes
alternate over --repeat repeats. Reported per plane: served throughput over offline, CPU-s per 1k
tokens per process, TTFT/ITL p50/p99, errors. ingress: the same, once per (ingress, data plane) of
separate/direct x default/haproxy (ServeSpec.ingress: direct has no ingress process; its engine
replica serves HTTP itself). engine-process: the same on direct/HAProxy, the replica's engine in
the replica's process vs in a child process of its own (ServeSpec.engine_process; the child's CPU is
reported as engine_core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import result_stream

RESULT = result_stream(sys.argv)  # before torch, DeepSpeed and Ray log anything

from clusterft.ports import free_port  # noqa: E402
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


def _titled(prefix: str) -> Callable[[list[str]], bool]:
    return lambda cmdline: " ".join(cmdline).startswith(prefix)


# role -> whether a process (by its command line) plays it.
SERVE_ROLES: dict[str, Callable[[list[str]], bool]] = {
    "engine": _titled("ray::ServeReplica:clusterft:engine"),
    "ingress": _titled("ray::ServeReplica:clusterft:ingress"),
    "proxy": _titled("ray::ProxyActor"),
    # RAY_SERVE_ENABLE_HA_PROXY: HAProxy's own process (path/to/haproxy -f ...), master and worker.
    "haproxy": lambda cmdline: bool(cmdline) and os.path.basename(cmdline[0]).startswith("haproxy"),
    # ServeSpec.engine_process: the replica's child (python -m clusterft.engine.core_process FD).
    "engine_core": lambda cmdline: cmdline[1:3] == ["-m", "clusterft.engine.core_process"],
}


def serve_processes(ingress: str = "separate") -> dict[str, list]:
    """role -> the psutil.Processes of the app's engine replica, ingress replica and HTTP proxy /
    HAProxy (found by the process titles Ray gives its actors, or HAProxy's binary name: its master
    and worker), and the load client (this process). A role with no process (no proxy actor behind
    HAProxy) is left out. Only this process's descendants are looked at (the local cluster it
    started): another Serve app on a shared machine has processes of the same titles."""
    import psutil

    client = psutil.Process()
    found: dict[str, list] = {"client": [client]}
    for process in client.children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.Error:  # ended meanwhile
            continue
        for role, plays in SERVE_ROLES.items():
            if plays(cmdline):
                found.setdefault(role, []).append(process)
    required = {"engine", "ingress"} if ingress == "separate" else {"engine"}  # direct: engine is ingress
    missing = required - set(found)
    assert not missing, f"no process found for {sorted(missing)}"
    return found


def cpu_seconds(processes: dict[str, list]) -> dict[str, float]:
    """CPU seconds of each role's processes so far, those they reaped included: HAProxy replaces its
    worker when Ray rewrites its config, and the old worker's CPU then counts in its master."""
    import psutil

    out = {}
    for role, members in processes.items():
        out[role] = 0.0
        for process in members:
            try:
                times = process.cpu_times()
            except psutil.Error:  # a replaced HAProxy worker: its master counts it once reaped
                continue
            out[role] += times.user + times.system + times.children_user + times.children_system
    return out


def cpu_per_1k_tokens(before: list[dict], after: list[dict], tokens: int) -> dict:
    """CPU seconds each role spent per 1,000 output tokens, summed over rounds."""
    roles = sorted({role for sample in before for role in sample})  # a role may start after round 1
    pairs = list(zip(before, after, strict=True))
    spent = {role: sum(a.get(role, 0.0) - b.get(role, 0.0) for b, a in pairs) for role in roles}
    return {role: round(1000 * seconds / tokens, 3) for role, seconds in spent.items()}


async def measure(
    url: str, llm, workloads: list[list[list[int]]], warmup, max_tokens, concurrency, ingress: str
) -> dict:
    """Alternate offline and served rounds (each round its own prompts, the same in both phases), so
    that load from elsewhere on the machine falls on both phases rather than on one of them. CPU
    seconds per process are counted per phase: offline, this process is the engine (nothing else
    runs in it then); served, the engine replica, the ingress, the proxy and this process (the client)."""
    import httpx

    offline, served = [], []
    cpu = {"offline": ([], []), "served": ([], [])}
    processes = serve_processes(ingress)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, MODEL, warmup, WARMUP_TOKENS)  # connections, first step
        # The served engines step only in served rounds: a round's count ends where the next begins.
        served_steps = await settled_steps(url, -1)
        for prompts in workloads:
            cpu["offline"][0].append(cpu_seconds({"engine": processes["client"]}))
            steps_before = llm.engine.num_steps
            offline.append(await asyncio.to_thread(run_offline, llm, prompts, max_tokens))
            offline[-1]["steps"] = llm.engine.num_steps - steps_before
            cpu["offline"][1].append(cpu_seconds({"engine": processes["client"]}))
            processes = serve_processes(ingress)  # each round: HAProxy may have replaced its worker
            cpu["served"][0].append(cpu_seconds(processes))
            served.append(await run_clients(client, url, prompts, max_tokens, concurrency))
            cpu["served"][1].append(cpu_seconds(processes))
            steps_before, served_steps = served_steps, await settled_steps(url, served_steps)
            served[-1]["steps"] = served_steps - steps_before
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
        # Engine steps per round, and output tokens per step: the mean decode batch (a prefill step
        # makes one token per request). Fewer tokens per step served than offline is batch lost
        # between requests (a closed-loop client's next request arrives a round trip after its last).
        "engine_steps": {"offline": [r["steps"] for r in offline], "served": [r["steps"] for r in served]},
        "output_tokens_per_step": {
            phase: round(sum(r["output_tokens"] for r in rounds) / max(1, sum(r["steps"] for r in rounds)), 2)
            for phase, rounds in (("offline", offline), ("served", served))
        },
        "served_over_offline_throughput": round(statistics.median(ratios), 3),
    }


def engine_settings(args, concurrency: int, prompt_len: int):
    from clusterft.serve.spec import EngineSettings

    return EngineSettings(
        max_num_seqs=concurrency,
        max_model_len=prompt_len + args.max_tokens + 16,
        num_gpu_blocks=concurrency * ((prompt_len + args.max_tokens) // 16 + 2),
    )


def measure_one_plane(args, model_dir: Path) -> dict:
    """The default measurement: served (args.data_plane) vs offline, alternating rounds."""
    from clusterft.serve.launch import start_app, stop_app
    from clusterft.serve.spec import ServeSpec

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_workload(args.requests * args.rounds + 1, args.prompt_len, vocab, args.seed)
    warmup = prompts.pop()
    workloads = [prompts[r * args.requests : (r + 1) * args.requests] for r in range(args.rounds)]
    engine = engine_settings(args, args.concurrency, args.prompt_len)
    spec = ServeSpec(
        model_dir=str(model_dir),
        served_model_name=MODEL,
        port=free_port(),
        engine=engine,
        tensor_parallel_size=args.tensor_parallel_size,
        max_queued_requests=args.requests,
        data_plane=args.data_plane,
        ingress=args.ingress,
        engine_process=args.engine_process,
        insecure=args.data_plane == "haproxy",  # HAProxy binds every interface; a bench needs no key
        **({"stream_interval": args.stream_interval} if args.stream_interval else {}),
    )
    llm = start_offline(model_dir, engine, warmup, max(1, int(spec.engine_num_cpus)))
    url = start_app(spec, log_to_driver=not args.json)
    try:
        measured = asyncio.run(
            measure(url, llm, workloads, warmup, args.max_tokens, args.concurrency, spec.ingress)
        )
    finally:
        stop_app()
    return {
        "stream_interval": spec.stream_interval,
        "data_plane": spec.data_plane,
        "ingress": spec.ingress,
        "engine_process": spec.engine_process,
        **measured,
    }


# --compare -> variant name -> the child's flags (ServeSpec.data_plane, ServeSpec.ingress)
VARIANTS: dict[str, dict[str, list[str]]] = {
    "data-plane": {
        plane: ["--data-plane", plane] for plane in ("default", "throughput_optimized", "haproxy")
    },
    "ingress": {
        f"{ingress}/{plane}": ["--ingress", ingress, "--data-plane", plane]
        for plane in ("default", "haproxy")
        for ingress in ("separate", "direct")
    },
    # The replica's engine in its own process or not, on the fastest plane measured (direct/haproxy).
    "engine-process": {
        "in-replica": ["--ingress", "direct", "--data-plane", "haproxy"],
        "engine-process": ["--ingress", "direct", "--data-plane", "haproxy", "--engine-process"],
    },
}


def compare_variants(args) -> dict:
    """measure_one_plane once per variant and repeat, each in a child process: Serve reads its flags
    as its processes start, so each variant needs a Ray cluster of its own; the variants alternate."""
    variants = VARIANTS[args.compare]
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    forwarded = [a for a in sys.argv[1:] if a not in ("--compare", args.compare, "--json")]
    for _ in range(args.repeat):
        for name, flags in variants.items():
            cmd = [sys.executable, __file__, *forwarded, *flags, "--json"]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
            if done.returncode not in (0, 1) or not done.stdout.strip():
                runs[name].append({"failed": f"exit {done.returncode}"})
                continue
            runs[name].append(json.loads(done.stdout))
    summary = {}
    for name, results in runs.items():
        ok = [r for r in results if "served" in r]
        summary[name] = {
            "served_over_offline": [r["served_over_offline_throughput"] for r in ok],
            "cpu_s_per_1k_tokens_served": [r["cpu_s_per_1k_tokens"]["served"] for r in ok],
            "ttft_ms": [r["served"]["ttft_ms"] for r in ok],
            "itl_ms": [r["served"]["itl_ms"] for r in ok],
            "errors": [r["served"]["errors"] for r in ok],
            "failed_runs": [r["failed"] for r in results if "failed" in r],
        }
    return {"variants": summary, "runs": runs}


def routing_workload(args, vocab: int, seed: int) -> list[list[int]]:
    """--system-prompts system prompts x --users user turns (16 tokens), shuffled."""
    rng = random.Random(seed)
    systems = make_workload(args.system_prompts, args.prompt_len, vocab, seed)
    prompts = [
        system + [rng.randrange(7, vocab) for _ in range(16)] for system in systems for _ in range(args.users)
    ]
    rng.shuffle(prompts)
    return prompts


def engine_counters(url: str, *names: str) -> list[float]:
    """Counters summed over every engine replica, from the app's /metrics (0 for one not seen yet)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name] += sample.value
    return [values[name] for name in names]


PREFIX_COUNTERS = ("clusterft_prefix_cache_hits_total", "clusterft_prefix_cache_queries_total")
STEPS_COUNTER = "clusterft_engine_steps_total"


async def settled(
    url: str, names: tuple[str, ...], ready: Callable[[list[float], list[float] | None], bool], every_s: float
) -> list[float]:
    """`names`' counters once `ready(this read, the read before)` holds (or after 30 s): the
    replicas send their stats every 0.2 s, so a read right after a round may not cover it yet."""
    previous = None
    deadline = time.monotonic() + 30
    while True:
        values = await asyncio.to_thread(engine_counters, url, *names)
        if ready(values, previous) or time.monotonic() > deadline:
            return values
        previous = values
        await asyncio.sleep(every_s)


async def settled_steps(url: str, before: float) -> float:
    """The engines' step counter once it has moved past `before` and stopped moving."""
    (steps,) = await settled(url, (STEPS_COUNTER,), lambda now, last: now == last and now[0] > before, 0.5)
    return steps


async def settled_counters(url: str, expected_queries: float) -> tuple[float, float]:
    """(prefix-cache hits, queries) once every replica's stats cover `expected_queries`."""
    hits, queries = await settled(url, PREFIX_COUNTERS, lambda now, _: now[1] >= expected_queries, 0.2)
    return hits, queries


async def routed_round(url: str, prompts: list[list[int]], warmup: list[int], args) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, MODEL, warmup, WARMUP_TOKENS)
        hits0, queries0 = await settled_counters(url, len(warmup))
        served = await run_clients(client, url, prompts, args.max_tokens, args.concurrency)
        hits1, queries1 = await settled_counters(url, queries0 + sum(len(p) for p in prompts))
    return {**served, "hits": hits1 - hits0, "queries": queries1 - queries0}


def compare_routing(args, model_dir: Path) -> dict:
    """Each round: the same shuffled workload through a fresh app per router (cold caches)."""
    from ray import serve

    from clusterft.serve.app import build_app
    from clusterft.serve.launch import connect_ray
    from clusterft.serve.spec import ServeSpec

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    port = free_port()
    engine = engine_settings(args, args.concurrency, args.prompt_len + 16)
    connect_ray(log_to_driver=not args.json)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rounds: dict[str, list[dict]] = {"pow2": [], "prefix": []}
    try:
        for r in range(args.rounds):
            prompts = routing_workload(args, vocab, args.seed + r)
            warmup = make_workload(1, 8, vocab, args.seed + 1000 + r)[0]  # shorter than a block
            for routing in rounds if r % 2 == 0 else reversed(list(rounds)):
                spec = ServeSpec(
                    model_dir=str(model_dir),
                    served_model_name=MODEL,
                    port=port,
                    engine=engine,
                    num_replicas=args.replicas,
                    routing=routing,
                    # --replicas engines and the ingress on a 2-core local cluster
                    engine_num_cpus=0.5,
                    ingress_num_cpus=0.25,
                    max_queued_requests=len(prompts),
                )
                serve.run(build_app(spec), name="clusterft", route_prefix="/")
                rounds[routing].append(asyncio.run(routed_round(url, prompts, warmup, args)))
                serve.delete("clusterft")
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    out = {}
    for routing, results in rounds.items():
        hits, queries = sum(r["hits"] for r in results), sum(r["queries"] for r in results)
        out[routing] = {
            "prefix_cache_hit_rate": round(hits / queries, 3) if queries else 0.0,
            "round_hit_rates": [round(r["hits"] / r["queries"], 3) if r["queries"] else 0.0 for r in results],
            "ttft_ms": latency_ms([t for r in results for t in r["ttft"]], 1),
            **throughput(results),
            "errors": sum(len(r["errors"]) for r in results),
        }
    return {"routers": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="HF model dir (default: a fresh tiny Llama of --size)")
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3, help="offline/served round pairs (routing: rounds)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (routing: of a system prompt)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument(
        "--stream-interval", type=int, default=None, help="the app's stream_interval (default: ServeSpec's)"
    )
    ap.add_argument("--compare", choices=["routing", *VARIANTS], help="a side-by-side comparison")
    ap.add_argument("--data-plane", choices=["default", "throughput_optimized", "haproxy"], default="default")
    ap.add_argument("--ingress", choices=["separate", "direct"], default="separate")
    ap.add_argument(
        "--engine-process", action="store_true", help="ServeSpec.engine_process: the engine in a child"
    )
    ap.add_argument("--repeat", type=int, default=2, help="data-plane, ingress: repeats of all variants")
    ap.add_argument("--replicas", type=int, default=2, help="routing: engine replicas")
    ap.add_argument("--system-prompts", type=int, default=8, help="routing: distinct system prompts")
    ap.add_argument("--users", type=int, default=12, help="routing: user turns per system prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args()

    from clusterft.hf.tiny import make_tiny_model

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            Path(args.model_dir) if args.model_dir else make_tiny_model(Path(tmp) / "m", "llama", args.size)
        )
        if args.compare in VARIANTS:
            if not args.model_dir:  # every child serves this same model
                sys.argv += ["--model-dir", str(model_dir)]
            measured = compare_variants(args)
        elif args.compare == "routing":
            measured = compare_routing(args, model_dir)
        else:
            measured = measure_one_plane(args, model_dir)
    result = {
        "workload": {
            "compare": args.compare,
            **({"requests": args.requests} if args.compare != "routing" else {}),
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "model_size": args.size if not args.model_dir else "given",
            "tensor_parallel_size": args.tensor_parallel_size,
            **(
                {"replicas": args.replicas, "system_prompts": args.system_prompts, "users": args.users}
                if args.compare == "routing"
                else {}
            ),
        },
        **measured,
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result, indent=None if args.json else 2), file=RESULT, flush=True)
    failed = measured.get("served", {}).get("errors", 0) if not args.compare else 0
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
