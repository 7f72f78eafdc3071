"""The fused C++ kernels (decode attention, rotary, K/V write) equal the torch reference path, and the
backend choice falls back (or fails) clearly when they cannot be built."""

from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn.functional as F

from clusterft.engine import LLM, SamplingParams, fused_attention
from clusterft.engine.attention import _decode_attention, plan_decode_blocks, write_kv
from clusterft.engine.models.layers import RMSNorm, RotaryEmbedding
from tests.engine.helpers import random_prompts

BS = 4


def make_case(kvh: int, group: int, hd: int, lens: list[int], shared_prefix_blocks: int, seed: int):
    """Random caches and block tables: shuffled block ids, the first requests sharing a prefix."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-n // BS) for n in lens) + 8
    k_cache = torch.randn(num_blocks, kvh, BS, hd, generator=gen)
    v_cache = torch.randn(num_blocks, kvh, BS, hd, generator=gen)
    free = list(range(num_blocks))
    rng.shuffle(free)
    prefix = [free.pop() for _ in range(shared_prefix_blocks)]
    tables = []
    for n in lens:
        need = -(-n // BS)
        own = prefix[:need] if n > shared_prefix_blocks * BS else []
        tables.append(own + [free.pop() for _ in range(need - len(own))])
    q = torch.randn(len(lens), kvh * group, hd, generator=gen)
    return q, k_cache, v_cache, tables


def contiguous_reference(q, k_cache, v_cache, tables, lens, scale, window):
    """Each request's context gathered into one contiguous (kvh, n, hd) run, then SDPA (GQA)."""
    kvh, hd = k_cache.shape[1], k_cache.shape[3]
    outs = []
    for i, (table, n) in enumerate(zip(tables, lens, strict=True)):
        first = max(0, n - window) if window else 0
        k = k_cache[table].transpose(0, 1).reshape(kvh, -1, hd)[:, first:n]
        v = v_cache[table].transpose(0, 1).reshape(kvh, -1, hd)[:, first:n]
        qi = q[i].view(kvh, -1, hd)
        outs.append(F.scaled_dot_product_attention(qi, k, v, scale=scale).reshape(-1, hd))
    return torch.stack(outs)


def padded(tables):
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


# Lengths: 1 token, exact block multiples, one past a multiple, long; prefix blocks shared by several.
LENS = [1, BS, 2 * BS, 2 * BS + 1, 3, 37, 8 * BS, 203, 5 * BS + 3]


@pytest.mark.parametrize(
    ("kvh", "group", "hd", "window"),
    [(2, 1, 8, None), (2, 4, 16, None), (1, 3, 32, None), (2, 2, 8, 7), (2, 4, 16, 2 * BS)],
)
def test_fused_equals_torch_path_and_reference(kvh, group, hd, window):
    q, k_cache, v_cache, tables = make_case(kvh, group, hd, LENS, shared_prefix_blocks=2, seed=kvh + hd)
    lens = torch.tensor(LENS)
    scale = hd**-0.5
    fused = fused_attention.paged_decode_attention(
        q, k_cache, v_cache, padded(tables), lens.to(torch.int32), scale, window
    )

    def scratch(n):
        return torch.empty(n, *k_cache.shape[1:]), torch.empty(n, *k_cache.shape[1:])

    parts = plan_decode_blocks(tables, lens, BS, window, torch.device("cpu"), scratch)
    torch_path = _decode_attention(q, k_cache, v_cache, parts, scale)
    expected = contiguous_reference(q, k_cache, v_cache, tables, LENS, scale, window)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, torch_path, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_fp32(dtype):
    q, k_cache, v_cache, tables = make_case(2, 2, 16, LENS, shared_prefix_blocks=1, seed=5)
    lens = torch.tensor(LENS, dtype=torch.int32)
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    out = fused_attention.paged_decode_attention(q, k_cache, v_cache, padded(tables), lens, 0.25, None)
    assert out.dtype == dtype
    expected = contiguous_reference(q.float(), k_cache.float(), v_cache.float(), tables, LENS, 0.25, None)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_table_shorter_than_context_is_refused():
    q, k_cache, v_cache, tables = make_case(1, 1, 8, [9], shared_prefix_blocks=0, seed=0)
    short = padded([tables[0][:2]])  # 9 tokens need 3 blocks of 4
    with pytest.raises(RuntimeError, match="fit the block tables"):
        lens = torch.tensor([9], dtype=torch.int32)
        fused_attention.paged_decode_attention(q, k_cache, v_cache, short, lens, 1.0, None)


def packed_qkv(tokens: int, heads: int, kv_heads: int, hd: int, dtype, seed: int):
    """q, k, v as the model makes them: (T, heads, hd) views into one packed projection output, so
    rows are strided, not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * hd, generator=gen) * 3).to(dtype)
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    return q.view(tokens, heads, hd), k.view(tokens, kv_heads, hd), v.reshape(tokens, kv_heads, hd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_and_kv_write_match_the_torch_path_bit_for_bit(dtype):
    """Element-wise kernels: the same bits as the torch ops, every dtype (each op rounds to it), on
    the strided views the model passes, including GQA and positions past the first block of tables."""
    hd, tokens = 32, 37
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    rotary = RotaryEmbedding(inv_freq, attention_scaling=0.9, max_positions=4096)
    q, k, v = packed_qkv(tokens, 8, 2, hd, dtype, seed=1)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(2))
    want_q, want_k = rotary.at(positions, fused=False)(q, k)
    got_q, got_k = rotary.at(positions, fused=True)(q, k)  # in place
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)

    caches = [torch.zeros(12, 2, BS, hd, dtype=dtype) for _ in range(4)]
    slots = torch.randperm(12 * BS, generator=torch.Generator().manual_seed(3))[:tokens]
    write_kv(caches[0], caches[1], k, v, slots)
    write_kv(caches[2], caches[3], k, v, slots, fused=True)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[2].abs().sum() > 0  # something was written


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_add_rms_norm_matches_the_torch_path_bit_for_bit(tokens):
    """The residual add and the norm after it in one call: the same bits as the torch path (its mean
    of squares is ATen's own reduction); bf16 falls back to the torch path."""
    gen = torch.Generator().manual_seed(tokens)
    norm = RMSNorm(256, 1e-6)
    norm.weight.data = torch.randn(256, generator=gen)
    hidden, delta = torch.randn(tokens, 256, generator=gen) * 5, torch.randn(tokens, 256, generator=gen)
    want = norm.add_norm(hidden, delta, fused=False)
    got = norm.add_norm(hidden, delta, fused=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(want[0], hidden + delta)
    half = norm.add_norm(hidden.bfloat16(), delta.bfloat16(), fused=True)  # not the kernel's dtype
    assert half[1].dtype == torch.float32 and torch.equal(half[0], hidden.bfloat16() + delta.bfloat16())
    with pytest.raises(RuntimeError, match="float32"):
        fused_attention.add_rms_norm(hidden.double(), delta.double(), norm.weight, 1e-6)


def test_rotary_and_kv_write_refuse_bad_input():
    q, k, v = packed_qkv(3, 2, 1, 8, torch.float32, seed=0)
    cos = sin = torch.ones(16, 8)
    with pytest.raises(RuntimeError, match="positions must lie in \\[0, 16\\)"):
        fused_attention.rotary_embedding_(q, k, torch.tensor([0, 5, 16]), cos, sin)
    with pytest.raises(RuntimeError, match="float32 tables"):
        fused_attention.rotary_embedding_(q, k, torch.tensor([0, 1, 2]), cos.double(), sin.double())
    k_cache = v_cache = torch.zeros(2, 1, BS, 8)
    with pytest.raises(RuntimeError, match="slots must lie in"):
        fused_attention.write_kv(k, v, k_cache, v_cache, torch.tensor([0, 1, 2 * BS]))
    with pytest.raises(RuntimeError, match="share a dtype"):
        fused_attention.write_kv(k.half(), v.half(), k_cache, v_cache, torch.tensor([0, 1, 2]))


def test_backend_choice(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fused_attention.use_fused("auto", cpu)  # g++ is here: the kernel builds
    assert not fused_attention.use_fused("torch", cpu)
    assert not fused_attention.use_fused("auto", cuda)
    with pytest.raises(ValueError, match="CPU kernel"):
        fused_attention.use_fused("fused", cuda)
    # A machine where the build fails: auto warns once and falls back, fused is an error naming why.
    monkeypatch.setattr(fused_attention, "_build_error", lambda: "could not build (no g++)")
    monkeypatch.setattr(fused_attention, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=fused_attention.__name__):
        assert not fused_attention.use_fused("auto", cpu)
        assert not fused_attention.use_fused("auto", cpu)
    assert [r.getMessage() for r in caplog.records] == [
        "attention_backend=auto falls back to the torch decode path: could not build (no g++)"
    ]
    with pytest.raises(fused_attention.FusedAttentionUnavailable, match="no g\\+\\+"):
        fused_attention.use_fused("fused", cpu)


def test_engine_backends_generate_the_same_tokens(model_dirs):
    """Both backends through the engine (prefix sharing, GQA on qwen2): the same greedy tokens, and
    the fused runner really skips the block plan."""
    prompts = random_prompts([5, 16, 33, 40], seed=4)
    prompts.append([*prompts[2][:20], 9, 10, 11])  # shares cached prefix blocks with prompt 2
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for arch in ("llama", "qwen2"):
        results = {}
        for backend in ("fused", "torch"):
            llm = LLM(model_dirs[arch], num_gpu_blocks=64, attention_backend=backend)
            assert llm.engine.executor.runner.fused is (backend == "fused")
            results[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert results["fused"] == results["torch"]
