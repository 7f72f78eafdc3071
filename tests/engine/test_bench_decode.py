"""bench/engine.py --decode, the code bench/gpu_check.sh runs on CUDA, run here on CPU: the decode
steps it times, the bytes it counts per step and the MBU it reports add up."""

from __future__ import annotations

import pytest

from bench.engine import classify_stacks, decode_throughput, table_bandwidth, weight_bytes
from clusterft.engine import LLM


def test_decode_throughput_counts_steps_bytes_and_mbu(llama_dir):
    peak = 1e10
    run = decode_throughput(llama_dir, 3, "cpu", "float32", peak, prompt_len=8, output_len=6)
    assert run["batch_size"] == 3 and run["decode_steps"] == 5  # the first token comes from prefill
    engine = LLM(llama_dir, num_gpu_blocks=8).engine
    args, weights = engine.model_args, weight_bytes(engine.model)
    kv_per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * 4
    assert run["bytes_per_step"] == int(weights + 3 * (8 + 3) * kv_per_token)  # mean context 8 + 3
    step = run["step_time_ms"] / 1e3
    assert run["tokens_per_s"] == pytest.approx(3 / step, rel=0.01)
    assert run["mbu"] == pytest.approx(run["bytes_per_step"] / step / peak, rel=0.01)


@pytest.mark.parametrize(
    ("name", "bandwidth"),
    [("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H200", 4.8e12),
     ("NVIDIA A100-SXM4-80GB", 2.039e12), ("NVIDIA GeForce RTX 4090", None)],
)  # fmt: skip
def test_peak_bandwidth_table_by_device_name(name, bandwidth):
    assert table_bandwidth(name) == bandwidth


def test_profile_shares_by_innermost_known_frame():
    gen = "main (bench/engine.py:9);generate (clusterft/engine/llm_engine.py:300)"
    raw = "\n".join([
        f"{gen};step (x.py:1);LlamaForCausalLM.forward (m.py:2);PackedLinear.forward (l.py:3) 6",
        f"{gen};Attention.forward (m.py:4);paged_attention (a.py:1);_decode_attention (a.py:2) 3",
        f"{gen};schedule (clusterft/engine/scheduler.py:5) 1",
        "make_tiny_model (tiny.py:1);PackedLinear.forward (l.py:3) 50",  # outside generate: left out
    ])  # fmt: skip
    shares = classify_stacks(raw)
    assert shares == {
        "matmuls (linear layers, lm_head)": 0.6,
        "attention: decode": 0.3,
        "scheduler + KV block manager": 0.1,
        "samples": 10,
    }
