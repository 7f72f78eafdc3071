"""Load a model and its tokenizer from a local HF directory (no hub: everything is offline)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from clusterft.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def check_model_dir(model_dir: str | Path) -> Path:
    """`model_dir` as a Path, or a UserError saying what is missing."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(
            f"model_name_or_path: {model_dir} is not an HF model directory (no config.json); "
            "make one with `clusterft make-tiny-model DIR` or point at a local model"
        )
    return path


def model_config(model_dir: str | Path) -> dict[str, Any]:
    """The model's config.json as a dict (cheap: no weights are read)."""
    return json.loads((check_model_dir(model_dir) / "config.json").read_text(encoding="utf-8"))


def model_fingerprint(model_dir: str | Path) -> str:
    """A cheap identity of a model dir: config.json, and each weight file's name, size, head and tail.

    It is what a LoRA checkpoint records about the frozen base it needs. Hashing every byte of a
    15 GB model at each start would cost a minute; a changed base model almost surely changes its
    config, a file size, or its first or last megabyte.
    """
    path = check_model_dir(model_dir)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved next to the model; a pad token is guaranteed (eos if the model has none)."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "tokenizer_config.json").is_file():
        check_model_dir(path)  # names the problem when this is not a model dir at all
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False):
    """A causal LM in `dtype` (fp32 on CPU), in train mode, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        check_model_dir(model_dir), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
    )
    model.train()
    return model
