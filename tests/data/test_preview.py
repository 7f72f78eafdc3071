from __future__ import annotations

import json

from clusterft.config.spec import DataArgs
from clusterft.data.preview import preview


def _data_dir(make_dataset_dir):
    records = [
        {"instruction": "reverse", "input": "123", "output": "321"},
        {"instruction": "sort", "input": "312", "output": "123"},
        {"instruction": "reverse", "input": "9" * 30, "output": "9" * 30},
    ]
    broken = '{"instruction": "a"}\n{"instruction": "b", "output": "c"}\n'
    info = {"d": {"file_name": "d.json"}, "b": {"file_name": "b.jsonl"}}
    return make_dataset_dir(info, {"d.json": json.dumps(records), "b.jsonl": broken})


def test_preview_marks_trained_tokens_and_counts(make_dataset_dir, tokenizer):
    dataset_dir = _data_dir(make_dataset_dir)
    data = DataArgs(dataset=["d"], dataset_dir=str(dataset_dir), template="chatml", cutoff_len=40)
    text = preview(data, tokenizer, 2)
    assert "<|im_start|>user\nreverse\n123<|im_end|>\n<|im_start|>assistant\n[[321<|im_end|>]]" in text
    assert "[[123<|im_end|>]]" in text
    assert f"── example 1 · {dataset_dir / 'd.json'}:1 · " in text
    assert "example 3" not in text
    assert "examples: 3 (train 3, eval 0)" in text
    assert "truncated: 1" in text
    assert "\x1b[" not in text


def test_preview_color_and_bad_records(make_dataset_dir, tokenizer):
    dataset_dir = _data_dir(make_dataset_dir)
    data = DataArgs(dataset=["d", "b"], dataset_dir=str(dataset_dir), template="chatml", val_size=1)
    text = preview(data, tokenizer, 1, color=True)
    assert "\x1b[32m" in text and "[[" not in text
    assert "(train 3, eval 1)" in text
    assert f"bad records: 1\n  {dataset_dir / 'b.jsonl'}:1: missing 'output'" in text
