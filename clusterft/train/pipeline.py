"""Pipeline parallelism: a Llama / Qwen2 causal LM cut into DeepSpeed `PipelineModule` stages.

    stage 0                         ...                     stage S-1
    [embed] [layer 0] [layer 1] ... | ... [layer L-1] [norm] [lm_head] → loss_fn(logits, labels)
      input_ids (B, T) → hidden (B, T, H) → ... → logits (B, T, V)

Each layer is a `LayerSpec`, so a stage builds (and reads from the safetensors files) only its own
layers. Every decoder layer computes its own rotary embedding and uses causal SDPA: with right
padding and padded labels of -100, no attention mask is needed. Tied embeddings (Qwen2's tiny/small)
become a `TiedLayerSpec` shared by the first and last stage, which DeepSpeed keeps in sync.

Parameters keep their HF names (`model.layers.3.mlp.up_proj.weight`), so pipeline checkpoints export
to an ordinary HF model dir, and the same consolidation code as the other strategies saves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clusterft.data import IGNORE_INDEX
from clusterft.errors import UserError

SUPPORTED = ("llama", "qwen2")


def _model_classes(model_type: str):
    if model_type == "llama":
        from transformers.models.llama import modeling_llama as m

        return m.LlamaDecoderLayer, m.LlamaRotaryEmbedding, m.LlamaRMSNorm
    from transformers.models.qwen2 import modeling_qwen2 as m

    return m.Qwen2DecoderLayer, m.Qwen2RotaryEmbedding, m.Qwen2RMSNorm


def _load_config(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SUPPORTED:
        raise UserError(
            f"parallel.strategy pipeline supports {', '.join(SUPPORTED)} models, not {config.model_type!r}"
        )
    config._attn_implementation = "sdpa"  # causal without a mask; eager would attend to the future
    return config


def _load_tensors(model_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors named `prefix...` from the model's safetensors files, with the prefix stripped."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name.startswith(prefix):
                    tensors[name[len(prefix) :]] = handle.get_tensor(name).float()
    return tensors


class _HFNamed(nn.Module):
    """A stage module whose parameters map to HF names: `hf_prefix` + the local name."""

    hf_prefix = ""

    def load_from(self, model_dir: Path) -> None:
        missing, _ = self.load_state_dict(_load_tensors(model_dir, self.hf_prefix), strict=False)
        assert not missing, f"{self.hf_prefix}: no weights for {missing}"


class EmbeddingPipe(_HFNamed):
    hf_prefix = "model.embed_tokens."

    def __init__(self, model_dir: Path):
        super().__init__()
        config = _load_config(model_dir)
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.load_from(model_dir)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (B, T) → (B, T, H)


class DecoderLayerPipe(_HFNamed):
    def __init__(self, model_dir: Path, layer_idx: int, activation_checkpointing: bool):
        super().__init__()
        config = _load_config(model_dir)
        layer_cls, rotary_cls, _ = _model_classes(config.model_type)
        self.hf_prefix = f"model.layers.{layer_idx}."
        self.layer = layer_cls(config, layer_idx)
        self.rotary = rotary_cls(config)  # buffers only: no parameters
        self.checkpointing = activation_checkpointing
        tensors = _load_tensors(model_dir, self.hf_prefix)
        missing, _ = self.layer.load_state_dict(tensors, strict=False)
        assert not missing, f"{self.hf_prefix}: no weights for {missing}"

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.size(1), device=hidden.device).unsqueeze(0)  # (1, T)
        out = self.layer(hidden, position_ids=positions, position_embeddings=self.rotary(hidden, positions))
        return out[0] if isinstance(out, tuple) else out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(self._forward, hidden, use_reentrant=False)
        return self._forward(hidden)


class NormPipe(_HFNamed):
    hf_prefix = "model.norm."

    def __init__(self, model_dir: Path):
        super().__init__()
        config = _load_config(model_dir)
        self.norm = _model_classes(config.model_type)[2](config.hidden_size, eps=config.rms_norm_eps)
        self.norm.load_state_dict(_load_tensors(model_dir, self.hf_prefix))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class HeadPipe(_HFNamed):
    hf_prefix = "lm_head."

    def __init__(self, model_dir: Path):
        super().__init__()
        config = _load_config(model_dir)
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.load_from(model_dir)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)  # (B, T, H) → (B, T, V)


def _tied_head(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, module.weight)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over trained positions (labels != -100) of one micro-batch."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def build_pipeline_module(model_dir: Path, num_stages: int, activation_checkpointing: bool = False):
    """The model as a `PipelineModule` of `num_stages` stages, layers balanced by parameter count."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    layers = config["num_hidden_layers"]
    if num_stages > layers:
        raise UserError(f"parallel.pipeline_stages={num_stages} exceeds the model's {layers} layers")
    tied = bool(config.get("tie_word_embeddings"))
    embed = TiedLayerSpec("embed", EmbeddingPipe, model_dir) if tied else LayerSpec(EmbeddingPipe, model_dir)
    specs = [
        embed,
        *(LayerSpec(DecoderLayerPipe, model_dir, i, activation_checkpointing) for i in range(layers)),
        LayerSpec(NormPipe, model_dir),
        TiedLayerSpec("embed", EmbeddingPipe, model_dir, forward_fn=_tied_head)
        if tied
        else LayerSpec(HeadPipe, model_dir),
    ]
    return PipelineModule(
        layers=specs, num_stages=num_stages, loss_fn=causal_lm_loss, partition_method="parameters"
    )


def hf_named_parameters(pipe: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(HF name, parameter) of this stage's parameters; a tied embedding appears under its HF name."""
    named: dict[str, nn.Parameter] = {}
    for module in pipe.modules():
        if isinstance(module, _HFNamed):
            for local, param in module.named_parameters():
                local = local.removeprefix("layer.").removeprefix("norm.")
                named.setdefault(module.hf_prefix + local, param)
    return sorted(named.items())


def pipeline_batch(examples: list, pad_token_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (B, length): the pipe sends fixed-shape activations between stages."""
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = min(len(example.input_ids), length)
        input_ids[row, :n] = torch.tensor(example.input_ids[:n])
        labels[row, :n] = torch.tensor(example.labels[:n])
    return input_ids, labels


def build_pipeline_engine_inputs(model_dir: Path, spec):
    """(this stage's PipelineModule, its (HF name, parameter) list, hidden size) for the recipe,
    which loads a checkpoint's weights into the parameters by HF name when resuming."""
    from clusterft.train.state import seed_everything

    seed_everything(spec.train.seed)
    module = build_pipeline_module(
        model_dir, spec.parallel.pipeline_stages, spec.train.gradient_checkpointing
    )
    named = hf_named_parameters(module)
    hidden_size = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["hidden_size"]
    return module, named, hidden_size


def pipeline_step(engine, micro_batches: list[list], pad_token_id: int, length: int) -> tuple[float, int]:
    """One optimizer step through the pipe (the micro-batches are the accumulation steps).

    Returns (loss averaged over micro-batches and data-parallel ranks, tokens this rank fed in)."""
    batches = [pipeline_batch(examples, pad_token_id, length) for examples in micro_batches]
    loss = engine.train_batch(data_iter=iter(batches))
    tokens = sum(int((ids != pad_token_id).sum()) for ids, _ in batches)
    return float(loss), tokens
