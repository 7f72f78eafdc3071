"""The fused C++ decode kernel equals the torch reference path, and the backend choice falls back
(or fails) clearly when the kernel cannot be built."""

from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn.functional as F

from clusterft.engine import LLM, SamplingParams, fused_attention
from clusterft.engine.attention import _decode_attention, plan_decode_blocks
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
            assert llm.engine.executor.runner.fused_decode is (backend == "fused")
            results[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert results["fused"] == results["torch"]
