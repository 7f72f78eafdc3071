"""LoRA / freeze / full on the tiny model; adapters in peft format; merge into an HF dir."""

from __future__ import annotations

import pytest
import torch

from clusterft.config.spec import MethodArgs
from clusterft.errors import UserError
from clusterft.hf.loading import load_model, load_tokenizer, model_fingerprint
from clusterft.hf.lora import apply_method, lora_target_modules, merge_adapter, save_trained, trainable_state


def test_lora_all_targets_every_linear_but_the_head(tiny_llama):
    model = load_model(tiny_llama)
    assert lora_target_modules(model, ["all"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    ]  # fmt: skip
    torch.manual_seed(0)
    peft_model = apply_method(model, MethodArgs(finetuning_type="lora", lora_rank=4))
    trainable = trainable_state(peft_model)
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 4 * 7 * 2  # 4 layers x 7 linears x (A, B)


def test_unknown_lora_target_is_a_user_error(tiny_llama):
    with pytest.raises(UserError, match="no module named qkv"):
        apply_method(load_model(tiny_llama), MethodArgs(lora_target=["qkv"]))


def test_freeze_trains_only_the_last_layers(tiny_llama):
    model = apply_method(
        load_model(tiny_llama), MethodArgs(finetuning_type="freeze", freeze_trainable_layers=1)
    )
    names = trainable_state(model)
    assert names and all(".layers.3." in name for name in names)


def test_adapter_saves_in_peft_format_and_merges(tiny_llama, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = apply_method(load_model(tiny_llama), MethodArgs(lora_rank=4))
    with torch.no_grad():  # B starts at zero: make the adapter do something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    adapter = save_trained(model, tmp_path / "adapter", load_tokenizer(tiny_llama))
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    expected = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(load_model(tiny_llama), adapter).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    merged_dir = merge_adapter(tiny_llama, adapter, tmp_path / "merged")
    merged = load_model(merged_dir).eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert model_fingerprint(merged_dir) != model_fingerprint(tiny_llama)
