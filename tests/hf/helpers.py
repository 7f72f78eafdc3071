"""Helpers shared by the tests of merged models: a LoRA adapter as a trained clusterft job leaves it."""

from __future__ import annotations

from pathlib import Path

import torch

from clusterft.config.spec import MethodArgs
from clusterft.hf.loading import load_model, load_tokenizer
from clusterft.hf.lora import apply_method, save_trained


def make_trained_adapter(base: Path, out_dir: Path, seed: int = 0, scale: float = 0.1) -> Path:
    """clusterft's default LoRA (rank 8, alpha 16, every projection) with lora_B ~ N(0, scale),
    saved in peft format with the tokenizer. B is zero when training starts; random B stands in for
    a trained one, and 0.1 makes the weight updates about as large as the base weights."""
    torch.manual_seed(seed)
    model = apply_method(load_model(base), MethodArgs(finetuning_type="lora"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    return save_trained(model, out_dir, load_tokenizer(base))
