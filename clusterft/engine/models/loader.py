"""Load an HF model dir (config.json + safetensors, single or sharded) into the paged model.

Tensor-parallel slicing happens here: a worker of rank r keeps only its heads' rows of q/k/v, its
columns of o_proj, and its slice of the MLP; embeddings, norms and lm_head are replicated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from clusterft.engine.models.layers import ParallelContext, RotaryEmbedding
from clusterft.engine.models.llama import LlamaForCausalLM, ModelConfig

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) as HF computes them, including rope scaling from config."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} in config.json is not supported (its frequencies change with the "
            f"sequence length); supported: {', '.join(_STATIC_ROPE_TYPES)}"
        )
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
    return inv_freq, float(scaling)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(
            f"{model_dir} has no model.safetensors(.index.json): save the model with safetensors"
        )
    return [single]


def _shard(name: str, tensor: torch.Tensor, args: ModelConfig, pc: ParallelContext) -> torch.Tensor:
    """This rank's slice of one HF tensor."""
    if pc.tp_size == 1:
        return tensor
    r, n = pc.tp_rank, pc.tp_size
    if name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # column parallel: split rows
        per = tensor.shape[0] // n
        return tensor[r * per : (r + 1) * per]
    if name in ("o_proj", "down_proj") and tensor.dim() == 2:  # row parallel: split columns
        per = tensor.shape[1] // n
        return tensor[:, r * per : (r + 1) * per]
    return tensor


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_model_len: int | None = None,
    pc: ParallelContext | None = None,
    quant_group_size: int | None = None,
    quant_exclude_modules: tuple[str, ...] = ("lm_head",),
):
    """Build the paged model from `model_dir`; returns (model, ModelConfig, HF config)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    pc = pc or ParallelContext()
    hf_config = AutoConfig.from_pretrained(model_dir)
    args = ModelConfig.from_hf_config(hf_config)
    inv_freq, scaling = rope_parameters(hf_config, args.head_dim)
    rotary = RotaryEmbedding(inv_freq, scaling, max(args.max_position_embeddings, max_model_len or 0))
    model = LlamaForCausalLM(args, rotary, pc, dtype)
    loaded: set[str] = set()
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                _load_tensor(model, args, pc, key, f.get_tensor(key), loaded)
    expected = 2 + args.num_layers * 9 + (0 if args.tie_word_embeddings else 1)
    if len(loaded) < expected:
        raise ValueError(
            f"{model_dir}: only {len(loaded)} of {expected} expected weights found in safetensors"
        )
    if quant_group_size:
        for name, module in model.named_modules():
            if hasattr(module, "quantize_") and not any(ex in name for ex in quant_exclude_modules):
                if name == "lm_head" and args.tie_word_embeddings:
                    continue  # shares the embedding table
                module.quantize_(quant_group_size)
    return model.eval(), args, hf_config


_PACKED_INTO = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "o_proj": "o_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "down_proj": "down_proj",
}
_NORM_RE = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight")


def _load_tensor(model: LlamaForCausalLM, args, pc, key: str, tensor: torch.Tensor, loaded: set[str]) -> None:
    if key == "model.embed_tokens.weight":
        model.embed_tokens.weight.data.copy_(tensor)
    elif key == "model.norm.weight":
        model.norm.weight.data.copy_(tensor)
    elif key == "lm_head.weight":
        if args.tie_word_embeddings:
            return
        model.lm_head.weight.data.copy_(tensor)
    elif m := _LAYER_RE.fullmatch(key):
        layer, block, proj, kind = int(m[1]), m[2], m[3], m[4]
        packed = getattr(getattr(model.layers[layer], block), _PACKED_INTO[proj])
        target = packed.weight if kind == "weight" else packed.bias
        if target is None:  # a row-parallel bias on rank > 0
            return
        start, end = packed.offsets[proj]
        target.data[start:end].copy_(_shard(proj, tensor, args, pc))
        if kind == "bias":
            return  # not counted: q/k/v biases are optional extras of their weights
    elif m := _NORM_RE.fullmatch(key):
        getattr(model.layers[int(m[1])], m[2]).weight.data.copy_(tensor)
    else:
        return  # rotary inv_freq buffers and other non-weights of older checkpoints
    loaded.add(key)
