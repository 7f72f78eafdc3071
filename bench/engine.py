"""Benchmark the paged engine against HF `generate` on one machine, one model, one workload.

Workload (fixed seed): N requests, prompt lengths uniform in [16, 512], output lengths exponential
with mean 128 capped at 1024 (ignore_eos so lengths are as drawn), greedy. HF runs static batches of
1, 8, 16, 32, 64 over the same requests (sorted by prompt length, which pads less), and its best
batch size is the baseline. Prints JSON with --json.

    python bench/engine.py --json                # the full run (several minutes on 2 CPU cores)
    python bench/engine.py --quick --json        # 16 requests, shorter outputs, HF batch sizes 1 and 16

--decode measures the engine alone at fixed batch sizes instead: B requests of 128 prompt and 128
output tokens run together; decode-only steps are timed, and memory-bandwidth utilisation is
MBU = (weight bytes + KV bytes the step's attention needs) / step time / peak bandwidth, the peak
from a table by device name, else measured by a large copy (bench/gpu_check.sh runs it on CUDA):

    python bench/engine.py --decode --device cuda --dtype bfloat16 --shape 1b --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import result_stream

RESULT = result_stream(sys.argv)  # before torch, DeepSpeed and Ray log anything

from clusterft.runtime import apply_runtime_defaults  # noqa: E402

apply_runtime_defaults()

import torch  # noqa: E402


def make_workload(
    num_requests: int, vocab_size: int, seed: int, max_prompt: int, mean_out: int, max_out: int
):
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(16, max_prompt)
        out_len = min(max(1, round(rng.expovariate(1.0 / mean_out))), max_out)
        prompt = [rng.randrange(7, vocab_size) for _ in range(prompt_len)]  # ids 0-6 are special tokens
        requests.append((prompt, out_len))
    return requests


def run_engine(model_dir: Path, requests, max_num_seqs: int, attention_backend: str = "auto"):
    from clusterft.engine import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048, enable_prefix_caching=False,
              attention_backend=attention_backend)  # fmt: skip
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False) for _, n in requests
    ]
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = llm.generate([p for p, _ in requests], params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return [o.outputs[0].token_ids for o in outputs], tokens / elapsed, tokens / cpu, llm.engine.get_stats()


def run_hf(model, requests, batch_size: int, pad_id: int):
    """Static batches over requests sorted by prompt length; each batch runs to its longest output."""
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    results: dict[int, list[int]] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(requests[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding
            prompt = requests[i][0]
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        max_new = max(requests[i][1] for i in idx)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
        for row, i in enumerate(idx):
            results[i] = out[row, width : width + requests[i][1]].tolist()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(n for _, n in requests)
    return [results[i] for i in range(len(requests))], tokens / elapsed, tokens / cpu


def prefix_ttft(model_dir: Path, vocab_size: int, seed: int) -> tuple[float, float]:
    """Mean time to first token of 16 requests sharing a 256-token prefix (16-token suffixes), each
    submitted alone: with the prefix cache emptied before each (cold) and after it holds the prefix (warm)."""
    from clusterft.engine import LLM, SamplingParams

    rng = random.Random(seed + 1)
    prefix = [rng.randrange(7, vocab_size) for _ in range(256)]
    prompts = [prefix + [rng.randrange(7, vocab_size) for _ in range(16)] for _ in range(16)]
    llm = LLM(model_dir, max_num_batched_tokens=2048)
    params = SamplingParams(temperature=0, max_tokens=1, detokenize=False)

    def ttft(prompt) -> float:
        start = time.perf_counter()
        llm.generate(prompt, params)
        return time.perf_counter() - start

    ttft(prompts[0])  # warm up the process (allocator, kernels)
    cold = []
    for p in prompts:
        llm.engine.reset_prefix_cache()
        cold.append(ttft(p))
    llm.generate(prompts[0], params)  # the prefix is cached from here on
    warm = [ttft(p) for p in prompts]
    return sum(cold) / len(cold), sum(warm) / len(warm)


def weight_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        if getattr(module, "qweight", None) is not None:
            tensors[id(module.qweight)], tensors[id(module.scales)] = module.qweight, module.scales
    return sum(t.numel() * t.element_size() for t in tensors.values())


def perplexity(llm, token_ids: list[int]) -> float:
    """Perplexity of the engine's model on one sequence (a single causal prefill, no sampling)."""
    from clusterft.engine.attention import AttentionMetadata, PrefillChunk
    from clusterft.engine.cache_engine import CacheEngine

    engine, args = llm.engine, llm.engine.model_args
    num_blocks = -(-len(token_ids) // 16)
    cache = CacheEngine(
        args.num_layers, args.num_kv_heads, args.head_dim, 16, num_blocks, 0, torch.float32, "cpu"
    )
    ids = torch.tensor(token_ids)
    positions = torch.arange(len(token_ids))
    meta = AttentionMetadata(positions, 0, [], [PrefillChunk(0, len(token_ids), 0, None)])
    with torch.inference_mode():
        hidden = engine.model(ids, positions, cache.gpu_cache, meta)
        logprobs = torch.log_softmax(engine.model.compute_logits(hidden[:-1]), dim=-1)
    return float(torch.exp(-logprobs.gather(1, ids[1:, None]).mean()))


def int8_report(model_dir: Path, requests, eval_ids: list[int]) -> dict:
    """Memory, speed and quality of int8 weights against fp32 on the same requests."""
    from clusterft.engine import LLM, SamplingParams

    report = {}
    outputs = {}
    for name, kwargs in [("fp32", {}), ("int8", {"quantization": "int8", "quant_group_size": 64})]:
        llm = LLM(model_dir, max_num_seqs=256, enable_prefix_caching=False, **kwargs)
        params = [
            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
            for _, n in requests
        ]
        start = time.process_time()
        outs = llm.generate([p for p, _ in requests], params)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        report[f"{name}_tokens_per_cpu_s"] = round(tokens / (time.process_time() - start), 1)
        report[f"{name}_weight_bytes"] = weight_bytes(llm.engine.model)
        report[f"{name}_perplexity"] = round(perplexity(llm, eval_ids), 3)
        outputs[name] = [o.outputs[0].token_ids for o in outs]
    pairs = [
        (a, b)
        for r, g in zip(outputs["fp32"], outputs["int8"], strict=True)
        for a, b in zip(r, g, strict=True)
    ]
    report["greedy_token_agreement"] = round(sum(a == b for a, b in pairs) / len(pairs), 4)
    report["greedy_first_divergence_mean"] = round(
        sum(next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
            for r, g in zip(outputs["fp32"], outputs["int8"], strict=True)) / len(requests), 1
    )  # fmt: skip
    report["weight_memory_saved"] = round(1 - report["int8_weight_bytes"] / report["fp32_weight_bytes"], 3)
    return report


# Peak memory bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(), first match wins.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB, SXM4 or PCIe
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
]

# --shape 1b: a random Llama of ~1.1B parameters (TinyLlama's shape), so that a GPU step is bound by
# memory like a real model's, not by kernel launches as the 5M-parameter "small" one is.
SHAPE_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip


def make_1b_model(out_dir: Path, dtype: torch.dtype) -> Path:
    """A randomly initialised ~1.1B Llama saved in `dtype`, with the tiny model's tokenizer (its ids
    stay below vocab_size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clusterft.hf.tiny import train_tokenizer

    train_tokenizer().save_pretrained(out_dir)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE_1B, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    return out_dir


def table_bandwidth(device_name: str) -> float | None:
    return next((bandwidth for key, bandwidth in PEAK_BANDWIDTH if key in device_name), None)


def peak_bandwidth(device: str) -> tuple[float, str]:
    """(bytes/s, where it comes from): the table's figure for this GPU, else a measured copy (read
    plus write of 1 GiB on CUDA, 256 MiB on CPU; a lower bound on the peak)."""
    if device == "cuda" and (bandwidth := table_bandwidth(name := torch.cuda.get_device_name())):
        return bandwidth, f"table: {name}"
    size = 2**30 if device == "cuda" else 2**28
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best, f"measured copy on {device}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_throughput(
    model_dir: Path, batch_size: int, device: str, dtype: str, peak: float, prompt_len: int = 128,
    output_len: int = 128,
) -> dict:  # fmt: skip
    """`batch_size` requests of `prompt_len` + `output_len` tokens run as one batch; the decode-only
    steps (every request adds one token) are timed. Bytes per step: all weights plus the K/V of every
    request's context, which is what a decode step has to read."""
    from clusterft.engine import LLM, SamplingParams

    budget = max(2048, batch_size * prompt_len)  # every prompt prefills in one step
    # 1 GiB of KV holds the batch (32 x 256 tokens of the 1b shape take 0.2 GiB) and is freed with
    # the engine, where sizing by gpu_memory_utilization would leave the next batch size no room.
    llm = LLM(model_dir, device=device, dtype=dtype, max_num_seqs=batch_size, kv_cache_space=1.0,
              max_num_batched_tokens=budget, enable_prefix_caching=False)  # fmt: skip
    engine, args = llm.engine, llm.engine.model_args
    rng = random.Random(batch_size)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    vocab = min(args.vocab_size, len(engine.tokenizer))
    for i in range(batch_size):
        engine.add_request(f"decode-{i}", [rng.randrange(7, vocab) for _ in range(prompt_len)], params)
    produced = 0
    while produced < batch_size:  # prefill steps: until every request has its first token
        produced += sum(1 for o in engine.step() if o.outputs[0].token_ids)
    step_times = []
    while engine.has_unfinished_requests():
        _sync(device)
        start = time.perf_counter()
        engine.step()
        _sync(device)
        step_times.append(time.perf_counter() - start)
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    kv_per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * element
    # Decode step j (1-based) reads the K/V of prompt_len + j tokens of every request.
    mean_context = prompt_len + (len(step_times) + 1) / 2
    step_bytes = weight_bytes(engine.model) + batch_size * mean_context * kv_per_token
    step_time = sum(step_times) / len(step_times)
    return {
        "batch_size": batch_size,
        "decode_steps": len(step_times),
        "step_time_ms": round(step_time * 1e3, 3),
        "tokens_per_s": round(batch_size / step_time, 1),
        "bytes_per_step": int(step_bytes),
        "mbu": round(step_bytes / step_time / peak, 4),
    }


def decode_report(args) -> dict:
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        model_dir = Path(args.model)
    elif args.shape == "1b":
        model_dir = make_1b_model(Path(tmp.name) / "llama-1b", getattr(torch, args.dtype))
    else:
        from clusterft.hf.tiny import make_tiny_model

        model_dir = make_tiny_model(Path(tmp.name) / "llama-small", "llama", "small")
    peak, peak_source = peak_bandwidth(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    runs = [
        decode_throughput(model_dir, int(b), args.device, args.dtype, peak)
        for b in args.decode_batch_sizes.split(",")
    ]
    return {
        "mode": "decode",
        "model": model_dir.name,
        "device": device_name,
        "dtype": args.dtype,
        "peak_bandwidth_bytes_per_s": peak,
        "peak_bandwidth_source": peak_source,
        "runs": runs,
    }


# Where the engine's time goes, by the innermost frame of each py-spy sample that names one of these.
PROFILE_CATEGORIES = [
    ("attention: decode", ("_decode_attention", "paged_decode_attention")),
    ("attention: prefill", ("paged_attention",)),
    ("KV write", ("write_kv",)),
    ("matmuls (linear layers, lm_head)", ("PackedLinear.forward",)),
    ("norm / rotary / silu", ("RMSNorm.forward", "add_norm", "RotaryEmbedding.forward", "rotate_in_place",
                              "rotate (clusterft", "_rotate_half", "MLP.forward")),
    ("model glue (embedding, views, residuals)",
     ("Attention.forward", "DecoderLayer.forward", "LlamaForCausalLM.forward", "compute_logits")),
    ("runner: input prep (ids, slots, block reads)",
     ("_prepare_inputs", "_decode_blocks", "_decode_tables", "plan_decode_blocks", "_update_states",
      "_lora_mapping")),
    ("sampler", ("sampler.py", "ModelRunner._sample")),
    ("scheduler + KV block manager", ("scheduler.py", "kv_cache_manager.py", "block_pool.py")),
    ("output processor", ("output_processor.py", "detokenizer.py")),
    ("engine loop (other)", ("model_runner.py", "llm_engine.py", "executor.py")),
]  # fmt: skip


def classify_stacks(raw: str) -> dict[str, float]:
    """py-spy's raw (collapsed) stacks -> each category's share of the samples taken inside
    LLM.generate (model loading and the workload's set-up are left out)."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if "generate (clusterft/engine/llm_engine.py" not in stack:
            continue
        frames = reversed(stack.split(";"))
        category = next(
            (c for f in frames for c, keys in PROFILE_CATEGORIES if any(k in f for k in keys)), "other"
        )
        counts[category] = counts.get(category, 0) + int(n)
    total = sum(counts.values())
    if not total:
        raise RuntimeError("py-spy took no sample inside LLM.generate: is py-spy allowed to ptrace here?")
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return {c: round(n / total, 3) for c, n in ranked} | {"samples": total}


def profile_engine(args) -> dict:
    """Run the engine's part of the bench alone under py-spy (200 samples/s) and split its time."""
    import shutil
    import subprocess

    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not on PATH: pip install -e '.[dev]' (py-spy is a dev dependency)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        child = [sys.executable, __file__, "--engine-only", "--num-requests", str(args.num_requests),
                 "--seed", str(args.seed), "--threads", str(args.threads),
                 "--attention", args.attention]  # fmt: skip
        if args.quick:
            child.append("--quick")
        subprocess.run(["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(raw), "--", *child],
                       check=True, stdout=sys.stderr)  # fmt: skip
        return {"mode": "profile", "shares": classify_stacks(raw.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="HF model dir (default: a fresh llama 'small' tiny model)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,16,32,64")
    parser.add_argument("--quick", action="store_true", help="16 requests, outputs mean 32, HF sizes 1,16")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both engine and HF")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 weight quantization report")
    parser.add_argument("--decode", action="store_true", help="decode tokens/s and MBU at fixed batch sizes")
    parser.add_argument("--decode-batch-sizes", default="1,32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="--decode only")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="--decode only")  # fmt: skip
    parser.add_argument("--shape", choices=["small", "1b"], default="small", help="--decode's random model")
    parser.add_argument("--profile", action="store_true", help="where the engine's time goes (py-spy)")
    parser.add_argument("--attention", choices=["auto", "fused", "torch"], default="auto",
                        help="decode attention backend (EngineConfig.attention_backend)")  # fmt: skip
    parser.add_argument("--engine-only", action="store_true", help="the engine's run alone (for --profile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        print(json.dumps(profile_engine(args), indent=None if args.json else 2), file=RESULT, flush=True)
        return
    if args.decode:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
        result = decode_report(args)
        print(json.dumps(result, indent=None if args.json else 2), file=RESULT, flush=True)
        return
    from transformers import AutoModelForCausalLM

    from clusterft.hf.tiny import make_tiny_model

    tmp = tempfile.TemporaryDirectory()
    model_dir = (
        Path(args.model) if args.model else make_tiny_model(Path(tmp.name) / "llama-small", "llama", "small")
    )
    num_requests, mean_out, max_out, sizes = args.num_requests, 128, 1024, args.batch_sizes
    if args.quick:
        num_requests, mean_out, max_out, sizes = min(num_requests, 16), 32, 256, "1,16"
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # ignore_eos: outputs run to their drawn length
    pad_id = hf.generation_config.pad_token_id or 0
    requests = make_workload(num_requests, hf.config.vocab_size, args.seed, 512, mean_out, max_out)

    engine_outputs, engine_tps, engine_cpu_tps, stats = run_engine(
        model_dir, requests, max_num_seqs=256, attention_backend=args.attention
    )
    if args.engine_only:
        print(json.dumps({"engine_tokens_per_cpu_s": round(engine_cpu_tps, 1)}), file=RESULT, flush=True)
        return
    hf_tps, hf_cpu_tps, hf_outputs = {}, {}, {}
    for b in [int(s) for s in sizes.split(",")]:
        hf_outputs[b], hf_tps[b], hf_cpu_tps[b] = run_hf(hf, requests, b, pad_id)
    best_b = max(hf_tps, key=hf_tps.get)
    best_cpu_b = max(hf_cpu_tps, key=hf_cpu_tps.get)
    reference = hf_outputs[min(hf_outputs)]  # the smallest batch pads least: the cleanest reference
    cold, warm = prefix_ttft(model_dir, hf.config.vocab_size, args.seed)
    int8 = None
    if not args.no_int8:
        from transformers import AutoTokenizer

        from clusterft.hf.tiny import CORPUS_PATH

        text = CORPUS_PATH.read_text(encoding="utf-8")
        eval_text = text[int(len(text) * 0.9) :]  # the corpus's last 10%, as an eval split
        eval_ids = AutoTokenizer.from_pretrained(model_dir).encode(eval_text, add_special_tokens=False)[:1024]
        int8 = int8_report(model_dir, requests[:16], eval_ids)
    result = {
        "model": str(model_dir.name),
        "num_requests": num_requests,
        "total_output_tokens": sum(n for _, n in requests),
        "engine_tokens_per_s": round(engine_tps, 1),
        "hf_tokens_per_s": round(hf_tps[best_b], 1),
        "hf_best_batch_size": best_b,
        "hf_tokens_per_s_by_batch_size": {str(b): round(t, 1) for b, t in hf_tps.items()},
        "speedup_vs_hf": round(engine_tps / hf_tps[best_b], 2),
        # Per CPU-second of this process (one thread): robust to other load on a shared machine.
        "engine_tokens_per_cpu_s": round(engine_cpu_tps, 1),
        "hf_tokens_per_cpu_s": round(hf_cpu_tps[best_cpu_b], 1),
        "hf_tokens_per_cpu_s_by_batch_size": {str(b): round(t, 1) for b, t in hf_cpu_tps.items()},
        "speedup_vs_hf_cpu": round(engine_cpu_tps / hf_cpu_tps[best_cpu_b], 2),
        "kv_utilization": round(stats.kv_utilization_at_peak, 4),
        "prefix_ttft_cold_s": round(cold, 4),
        "prefix_ttft_warm_s": round(warm, 4),
        "prefix_ttft_ratio": round(cold / warm, 2),
        "greedy_match_hf": engine_outputs == reference,
        "greedy_match_hf_requests": sum(a == b for a, b in zip(engine_outputs, reference, strict=True)),
        "greedy_reference_batch_size": min(hf_outputs),
        "threads": args.threads,
        "attention_backend": args.attention,
        "int8": int8,
    }
    print(json.dumps(result, indent=None if args.json else 2), file=RESULT, flush=True)


if __name__ == "__main__":
    main()
