"""Make tiny Llama / Qwen2 models and a byte-level BPE tokenizer, entirely offline.

No hub is reachable on the machines this project runs its tests and demo on, so the project makes
its own models: a tokenizer trained in milliseconds on bundled text, and a randomly initialised
`LlamaForCausalLM` or `Qwen2ForCausalLM` saved in HF format (config.json + model.safetensors), so
every loader in the ecosystem (`AutoModelForCausalLM.from_pretrained`, peft, our engine) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

Arch = Literal["llama", "qwen2"]
Size = Literal["tiny", "small"]

# Special tokens of the chat templates we ship (chatml/qwen and llama3), so that rendered
# conversations tokenize their control tokens as single ids.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one tiny model; `num_key_value_heads < num_attention_heads` means GQA."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool


SHAPES: dict[tuple[Arch, Size], ModelShape] = {
    # ~0.8 M parameters: learns 2-digit arithmetic from scratch in minutes on 2 CPU cores.
    ("llama", "tiny"): ModelShape(128, 256, 4, 4, 4, 1024, False),
    # Qwen2 differs on purpose: GQA (8 query heads share 2 KV heads), tied embeddings, qkv biases.
    ("qwen2", "tiny"): ModelShape(128, 256, 4, 8, 2, 1024, True),
    # A few million parameters: big enough that benchmarks measure compute, not Python overhead.
    ("llama", "small"): ModelShape(256, 688, 6, 8, 8, 2048, False),
    ("qwen2", "small"): ModelShape(256, 688, 6, 8, 2, 2048, True),
}


def train_tokenizer(vocab_size: int = 1024, corpus: str | None = None):
    """Train a byte-level BPE tokenizer (digits split one per token) on the bundled corpus.

    Deterministic: the same corpus and vocab size give the same vocabulary and merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus if corpus is not None else CORPUS_PATH.read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    # Individual digits (as Llama 3 and Qwen do) keep arithmetic learnable by a tiny model.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=2048,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_model(out_dir: str | Path, arch: Arch = "llama", size: Size = "tiny", seed: int = 0) -> Path:
    """Write a tokenizer and a randomly initialised model of `arch`/`size` to `out_dir`; return it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if (arch, size) not in SHAPES:
        raise ValueError(
            f"unknown model {arch}/{size}: choose arch from llama|qwen2 and size from tiny|small"
        )
    shape = SHAPES[(arch, size)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(out)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model_cls = LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM
    model = model_cls(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False
    )
    model.save_pretrained(out)
    return out


def count_parameters(model_dir: str | Path) -> int:
    """Number of parameters of the model saved in `model_dir` (tied weights counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())
