from __future__ import annotations

import pytest

from clusterft.data import IGNORE_INDEX, Example, encode_example, get_template
from clusterft.data.preprocess import encode_examples, infer_seqlen

TWO_TURNS = [
    {"role": "user", "content": "reverse\n123"},
    {"role": "assistant", "content": "321"},
    {"role": "user", "content": "sort"},
    {"role": "assistant", "content": "123"},
]


def _example(messages, line: int = 1) -> Example:
    return Example(messages=messages, source_file="d.json", line=line)


def _trained_spans(encoded, tokenizer) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token, "a label is the token itself (the model shifts)"
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run)), run.clear()
    if run:
        spans.append(tokenizer.decode(run))
    return spans


@pytest.mark.parametrize(
    ("template", "end_of_turn"),
    [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("default", "<|im_end|>")],
)
def test_only_assistant_tokens_and_end_of_turn_are_labelled(tokenizer, template, end_of_turn):
    encoded = encode_example(
        _example(TWO_TURNS), get_template(template, tokenizer), tokenizer, cutoff_len=512
    )
    assert len(encoded.input_ids) == len(encoded.labels)
    assert _trained_spans(encoded, tokenizer) == [f"321{end_of_turn}", f"123{end_of_turn}"]
    full_text = "".join(p + r for p, r in get_template(template, tokenizer).turns(TWO_TURNS))
    assert tokenizer.decode(encoded.input_ids) == full_text


def test_chatml_ids_exactly(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    encoded = encode_example(
        _example(TWO_TURNS[:2]), get_template("chatml", tokenizer), tokenizer, cutoff_len=512
    )
    prompt = tokenizer.encode("<|im_start|>user\nreverse\n123<|im_end|>\n<|im_start|>assistant\n")
    response = [ids("3"), ids("2"), ids("1"), ids("<|im_end|>")]
    assert encoded.input_ids == prompt + response
    assert encoded.labels == [IGNORE_INDEX] * len(prompt) + response


def test_tokenizer_template_encodes_like_chatml(tokenizer):
    chatml = encode_example(_example(TWO_TURNS), get_template("chatml", tokenizer), tokenizer, cutoff_len=512)
    own = encode_example(_example(TWO_TURNS), get_template("tokenizer", tokenizer), tokenizer, cutoff_len=512)
    assert own == chatml


def test_train_on_prompt_labels_everything(tokenizer):
    encoded = encode_example(
        _example(TWO_TURNS),
        get_template("chatml", tokenizer),
        tokenizer,
        cutoff_len=512,
        train_on_prompt=True,
    )
    assert encoded.labels == encoded.input_ids


def test_mask_history_trains_on_the_last_turn_only(tokenizer):
    template = get_template("chatml", tokenizer)
    masked = encode_example(_example(TWO_TURNS), template, tokenizer, cutoff_len=512, mask_history=True)
    plain = encode_example(_example(TWO_TURNS), template, tokenizer, cutoff_len=512)
    assert masked.input_ids == plain.input_ids
    assert _trained_spans(masked, tokenizer) == ["123<|im_end|>"]


@pytest.mark.parametrize(
    ("source", "target", "cutoff", "expected"),
    [
        (10, 3, 100, (10, 3)),  # fits
        (100, 3, 20, (17, 3)),  # short target kept whole, source cut
        (4, 100, 20, (4, 16)),  # short source kept whole, target cut
        (60, 40, 20, (12, 8)),  # both long: shared in proportion
        (20, 3, 5, (5, 0)),  # too small a budget for any of the target
    ],
)
def test_infer_seqlen_matches_llamafactory(source, target, cutoff, expected):
    assert infer_seqlen(source, target, cutoff) == expected


def test_cutoff_truncation(tokenizer):
    template = get_template("chatml", tokenizer)
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "1234567890" * 4}]
    full = encode_example(_example(long_answer), template, tokenizer, cutoff_len=512)
    cut = encode_example(_example(long_answer), template, tokenizer, cutoff_len=20)
    assert len(cut.input_ids) == 20 == len(cut.labels)
    prompt_len = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    # The prompt (7 tokens) is short: kept whole, the answer cut to the rest of the budget.
    assert cut.input_ids == full.input_ids[:20]
    assert cut.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert cut.labels[prompt_len:] == full.input_ids[prompt_len:20]
    # Multi-turn: the second turn gets what the first left.
    two = encode_example(_example(TWO_TURNS), template, tokenizer, cutoff_len=24)
    assert len(two.input_ids) == 24


def test_examples_without_a_trained_token_after_truncation_are_bad_records(tokenizer):
    template = get_template("chatml", tokenizer)
    fine = _example([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], line=1)
    # A 6-token answer after a long prompt: its share of 12 tokens rounds down to 0.
    long_prompt = [{"role": "user", "content": "reverse " * 40}, {"role": "assistant", "content": "12345"}]
    result = encode_examples(
        [fine, _example(long_prompt, line=2), _example(long_prompt, line=5)],
        template,
        tokenizer,
        cutoff_len=12,
    )
    assert result.examples == [fine]
    assert [str(p) for p in result.problems] == [
        f"d.json:{line}: no response token left after truncation to cutoff_len=12 (the prompt is too long); "
        "raise cutoff_len or shorten the prompt"
        for line in (2, 5)
    ]
    assert result.num_truncated == 2


def test_worker_processes_encode_the_same_as_one_process(tokenizer):
    template = get_template("chatml", tokenizer)
    long_prompt = [{"role": "user", "content": "reverse " * 40}, {"role": "assistant", "content": "12345"}]
    examples = [_example(TWO_TURNS, line=i) for i in range(7)] + [_example(long_prompt, line=9)]
    serial = encode_examples(examples, template, tokenizer, cutoff_len=12)
    parallel = encode_examples(examples, template, tokenizer, cutoff_len=12, num_workers=2)
    assert parallel == serial
    assert [p.line for p in parallel.problems] == [9]
