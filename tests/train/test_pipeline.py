"""The pipelined model computes what the HF model computes (one process, one stage, no Ray)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from clusterft.hf.loading import load_model
from clusterft.hf.tiny import make_tiny_model
from clusterft.train.pipeline import build_pipeline_module, causal_lm_loss, hf_named_parameters


@pytest.fixture(scope="module")
def process_group():
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: GQA, qkv biases, tied embeddings
def test_pipeline_module_matches_hf_model(process_group, tmp_path, arch):
    model_dir = make_tiny_model(tmp_path / arch, arch, "tiny")
    pipe = build_pipeline_module(model_dir, num_stages=1).eval()
    reference = load_model(model_dir).eval()
    input_ids = torch.randint(0, 500, (2, 12))
    labels = input_ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        logits = pipe(input_ids)
        expected = reference(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected.loss, atol=1e-5, rtol=1e-5)
    names = {name for name, _ in hf_named_parameters(pipe)}
    assert names == {name for name, _ in reference.named_parameters()}
