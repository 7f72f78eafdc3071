from __future__ import annotations

import pytest

from clusterft.config.spec import TEMPLATES
from clusterft.data import DatasetError, get_template, render_prompt
from clusterft.data.template import NAMED_TEMPLATES

CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
]
NO_SYSTEM = CONVERSATION[1:]

# (prompt, response) per turn; the tiny tokenizer's eos is <|im_end|>.
EXPECTED_TURNS = {
    "default": [
        ("System: S<|im_end|>\nHuman: q1<|im_end|>\nAssistant:", "a1<|im_end|>"),
        ("\nHuman: q2<|im_end|>\nAssistant:", "a2<|im_end|>"),
    ],
    "alpaca": [
        ("S### Instruction:\nq1\n\n### Response:\n", "a1<|im_end|>"),
        ("\n\n### Instruction:\nq2\n\n### Response:\n", "a2<|im_end|>"),
    ],
    "chatml": [
        (
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n",
            "a1<|im_end|>",
        ),
        ("\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", "a2<|im_end|>"),
    ],
    "qwen": [
        (
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n",
            "a1<|im_end|>",
        ),
        ("\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", "a2<|im_end|>"),
    ],
    "llama3": [
        (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nq1<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "a1<|eot_id|>",
        ),
        (
            "<|start_header_id|>user<|end_header_id|>\n\nq2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "a2<|eot_id|>",
        ),
    ],
    # The tiny tokenizer's chat_template is chatml: the same turns as the named chatml template.
    "tokenizer": [
        (
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n",
            "a1<|im_end|>",
        ),
        ("\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", "a2<|im_end|>"),
    ],
}


def test_every_template_of_the_spec_is_implemented():
    assert set(EXPECTED_TURNS) == set(TEMPLATES) == {*NAMED_TEMPLATES, "tokenizer"}


@pytest.mark.parametrize("name", sorted(EXPECTED_TURNS))
def test_turns_exact_strings(name, tokenizer):
    assert get_template(name, tokenizer).turns(CONVERSATION) == EXPECTED_TURNS[name]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("default", "Human: q<|im_end|>\nAssistant:"),
        (
            "alpaca",
            "Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\nq\n\n### Response:\n",
        ),
        ("chatml", "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"),
        (
            "qwen",
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
            "You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "llama3",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("tokenizer", "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_render_prompt_adds_the_generation_prompt_and_default_system(name, expected, tokenizer):
    assert render_prompt([{"role": "user", "content": "q"}], name, tokenizer) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED_TURNS))
def test_render_prompt_of_a_history_continues_the_training_text(name, tokenizer):
    """The prompt for turn 2 is exactly the training text up to turn 2's response."""
    prompt = render_prompt(CONVERSATION[:-1], name, tokenizer)
    turns = get_template(name, tokenizer).turns(CONVERSATION)
    assert prompt == turns[0][0] + turns[0][1] + turns[1][0]


def test_tool_turns_use_the_observation_slot(tokenizer):
    messages = [*NO_SYSTEM[:2], {"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}]
    assert get_template("chatml", tokenizer).turns(messages)[1] == (
        "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n",
        "a<|im_end|>",
    )


def test_stop_words(tokenizer):
    assert get_template("chatml", tokenizer).stop_words == ("<|im_end|>",)
    assert get_template("llama3", tokenizer).stop_words == ("<|eot_id|>",)
    assert get_template("default", tokenizer).stop_words == ("<|im_end|>",)
    assert get_template("tokenizer", tokenizer).stop_words == ("<|im_end|>",)


def test_render_prompt_needs_a_user_turn_last(tokenizer):
    with pytest.raises(ValueError, match="ending with a user"):
        render_prompt(NO_SYSTEM, "chatml", tokenizer)


def test_tokenizer_template_without_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)  # a fresh copy: the session one stays intact
    bare.chat_template = None
    with pytest.raises(DatasetError, match="has no chat_template"):
        get_template("tokenizer", bare)


def test_unknown_template(tokenizer):
    with pytest.raises(DatasetError, match="unknown template 'chatlm'"):
        get_template("chatlm", tokenizer)
