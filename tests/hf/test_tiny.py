"""Tiny models: made offline, reloaded by HF's Auto classes, `generate` runs, text round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clusterft.hf.tiny import SHAPES, make_tiny_model, train_tokenizer


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param, size="tiny")


def test_reloads_offline_and_generates(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (tiny_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == config["model_type"]
    shape = SHAPES[(config["model_type"], "tiny")]
    assert model.config.num_key_value_heads == shape.num_key_value_heads
    assert model.config.tie_word_embeddings == shape.tie_word_embeddings
    inputs = tokenizer("12+34=", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 6)


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "a", "llama", "tiny", seed=3))
    b = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "b", "llama", "tiny", seed=3))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "12+34=46", "café naïve 日本語 🙂", "  leading and trailing  ", "a\nb\tc", ""],
)
def test_tokenizer_round_trips_text_exactly(tiny_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens_and_specials_atomic(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer("1234", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [im_end]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_chat_template_is_chatml(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_training_is_deterministic() -> None:
    assert train_tokenizer().get_vocab() == train_tokenizer().get_vocab()


def test_unknown_shape_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose arch from llama\\|qwen2 and size from tiny\\|small"):
        make_tiny_model(tmp_path, arch="gpt2", size="tiny")  # type: ignore[arg-type]
