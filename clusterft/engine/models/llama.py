"""Paged Llama-family decoder (Llama, Mistral, Qwen2): the HF architecture, fed a flat batch of tokens
whose K/V go through block tables instead of a per-request contiguous cache.

Qwen2 is Llama with biases on q/k/v; both load from HF safetensors (see loader.py). Layers compute in
HF's op order so that fp32 greedy decoding matches HF `generate` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clusterft.engine.attention import AttentionMetadata, paged_attention, write_kv
from clusterft.engine.models.layers import (
    LoRAMapping,
    PackedLinear,
    ParallelContext,
    RMSNorm,
    RotaryEmbedding,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """The paged model's architecture, read from an HF config (not the job spec's `model` section)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    sliding_window: int | None = None  # each token attends to the last W positions only (Mistral)

    @classmethod
    def from_hf_config(cls, config) -> ModelConfig:
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {config.model_type!r} is not supported by the engine; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; the engine implements silu")
        qwen2 = config.model_type == "qwen2"
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=_sliding_window(config),
        )


def _sliding_window(config) -> int | None:
    """The window every layer uses, or None for full attention; a model mixing windowed and full
    layers (Qwen2 with max_window_layers, Gemma-style alternation) is refused, not run wrongly."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    layer_types = set(getattr(config, "layer_types", None) or [])
    if window is not None and len(layer_types) > 1:
        raise ValueError(
            f"this {config.model_type} model mixes sliding-window and full-attention layers "
            f"({sorted(layer_types)}), which the engine does not implement; serve it with full "
            "attention everywhere only if it was trained that way (use_sliding_window: false)"
        )
    if layer_types == {"full_attention"} or window is None or window >= config.max_position_embeddings:
        return None
    return int(window)


class Attention(nn.Module):
    def __init__(self, args: ModelConfig, pc: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        if args.num_heads % pc.tp_size or args.num_kv_heads % pc.tp_size:
            raise ValueError(
                f"tensor_parallel_size {pc.tp_size} must divide num_attention_heads ({args.num_heads}) "
                f"and num_key_value_heads ({args.num_kv_heads})"
            )
        self.num_heads = args.num_heads // pc.tp_size  # this worker's heads
        self.num_kv_heads = args.num_kv_heads // pc.tp_size
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = PackedLinear(
            args.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, args.qkv_bias, dtype
        )
        # Row-parallel: each worker adds its heads' share; the bias is added once (rank 0).
        self.o_proj = PackedLinear(
            q_size, {"o_proj": args.hidden_size}, args.o_bias and pc.tp_rank == 0, dtype
        )
        self.pc = pc

    def forward(self, x, kv_cache, meta: AttentionMetadata, rotate, lora) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, lora)  # (T, (h + 2 kvh) * hd)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = rotate(q, k)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping, meta.fused_kernels)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # (T, h, hd)
        return self.pc.all_reduce(self.o_proj(o.reshape(num_tokens, q_size), lora))


class MLP(nn.Module):
    def __init__(self, args: ModelConfig, pc: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        if args.intermediate_size % pc.tp_size:
            raise ValueError(f"tensor_parallel_size {pc.tp_size} must divide intermediate_size")
        inter = args.intermediate_size // pc.tp_size
        self.inter = inter
        self.gate_up_proj = PackedLinear(
            args.hidden_size, {"gate_proj": inter, "up_proj": inter}, args.mlp_bias, dtype
        )
        self.down_proj = PackedLinear(
            inter, {"down_proj": args.hidden_size}, args.mlp_bias and pc.tp_rank == 0, dtype
        )
        self.pc = pc

    def forward(self, x: torch.Tensor, lora: LoRAMapping | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).split([self.inter, self.inter], dim=-1)
        return self.pc.all_reduce(self.down_proj(F.silu(gate) * up, lora))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelConfig, pc: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(args, pc, dtype)
        self.mlp = MLP(args, pc, dtype)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, hidden, delta, kv_cache, meta, rotate, lora) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the residual stream; delta: the previous layer's MLP output, not yet added to it
        (None before the first layer). Returns both for the next layer, whose norm adds them (HF adds
        at the end of each layer; the sums are the same, and the add fuses with the norm)."""
        fused = meta.fused_kernels
        hidden, x = self.input_layernorm.add_norm(hidden, delta, fused)
        x = self.self_attn(x, kv_cache, meta, rotate, lora)
        hidden, x = self.post_attention_layernorm.add_norm(hidden, x, fused)
        return hidden, self.mlp(x, lora)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        args: ModelConfig,
        rotary: RotaryEmbedding,
        pc: ParallelContext | None = None,
        dtype=torch.float32,
    ) -> None:
        super().__init__()
        pc = pc or ParallelContext()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(args, pc, dtype) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = PackedLinear(args.hidden_size, {"lm_head": args.vocab_size}, False, dtype)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = rotary

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora: LoRAMapping | None = None,
    ) -> torch.Tensor:  # (T, hidden)
        hidden, delta = self.embed_tokens(input_ids), None
        rotate = self.rotary.at(positions, meta.fused_kernels)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, delta = layer(hidden, delta, kv_cache, meta, rotate, lora)
        return self.norm.add_norm(hidden, delta, meta.fused_kernels)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, hidden) -> (N, V) float32
        return self.lm_head(hidden).float()
