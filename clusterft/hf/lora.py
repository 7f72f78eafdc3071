"""Fine-tuning methods on an HF model: LoRA via peft, freeze (train the last N layers), full.

Adapters are saved in peft's own format (adapter_config.json + adapter_model.safetensors), so
`PeftModel.from_pretrained` and our engine load them; `merge_adapter` folds one into its base and
writes a plain HF model directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from clusterft.config.spec import MethodArgs, ModelArgs
from clusterft.errors import UserError

LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def lora_target_modules(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Module name suffixes to adapt: `all` means every linear layer but the output head."""
    if targets != ["all"]:
        return targets
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    return sorted(names)


def apply_method(model: torch.nn.Module, method: MethodArgs, model_args: ModelArgs | None = None):
    """Make exactly the parameters `method` trains require grad; wrap with LoRA when asked.

    Deterministic given torch's RNG state (LoRA's A matrices are randomly initialised), so every
    worker seeded alike builds the same adapter.
    """
    if method.finetuning_type == "full":
        model.requires_grad_(True)
        return model
    if method.finetuning_type == "freeze":
        layers = {int(m.group(1)) for name, _ in model.named_parameters() if (m := LAYER_RE.search(name))}
        trained = set(sorted(layers)[-method.freeze_trainable_layers :])
        for name, param in model.named_parameters():
            match = LAYER_RE.search(name)
            param.requires_grad_(bool(match) and int(match.group(1)) in trained)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if model_args is not None and model_args.adapter_name_or_path:
        return PeftModel.from_pretrained(model, model_args.adapter_name_or_path, is_trainable=True)
    targets = lora_target_modules(model, method.lora_target)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise UserError(
            f"lora_target: no module named {', '.join(missing)} in this model; "
            f"use `all` or some of {', '.join(lora_target_modules(model, ['all']))}"
        )
    config = LoraConfig(
        r=method.lora_rank,
        lora_alpha=method.effective_lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name → detached CPU copy of every trainable parameter (the adapter only, under LoRA)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters; every one must be present, with its shape."""
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
        raise UserError(
            f"checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "was the model, finetuning_type or lora_target changed? (resume: {weights_only: true} "
            "does not help here: start a new run)"
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise UserError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, the model "
                    f"{tuple(params[name].shape)}: was lora_rank or the model changed?"
                )
            params[name].copy_(value)


def save_trained(model: torch.nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """A peft adapter dir (LoRA) or a full HF model dir, plus the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def merge_adapter(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32"
) -> Path:
    """Fold a LoRA adapter into its base model loaded in `dtype` and save a plain HF model dir (with
    the tokenizer). Unchecked: `clusterft.hf.merge_check.merge_checked` is the merge to publish."""
    from peft import PeftModel

    from clusterft.hf.loading import load_model, load_tokenizer

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a peft adapter dir (no adapter_config.json)")
    model = PeftModel.from_pretrained(load_model(base_dir, dtype=dtype), adapter)
    merged = model.merge_and_unload()
    merged.eval()
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_dir
    return save_trained(merged, out_dir, load_tokenizer(tokenizer_dir))
