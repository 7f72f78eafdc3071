from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterft.config.spec import DataArgs
from clusterft.data import DatasetError, build_datasets, exact_match, load_examples
from clusterft.data.demo_data import write_demo_datasets
from clusterft.runtime import PROJECT_ROOT

DEMO_DIR = PROJECT_ROOT / "examples" / "data"


def _records(count: int) -> str:
    return json.dumps(
        [
            {"instruction": "reverse", "input": str(100 + i), "output": str(100 + i)[::-1]}
            for i in range(count)
        ]
    )


@pytest.fixture
def numbers_dir(make_dataset_dir) -> Path:
    info = {"nums": {"file_name": "nums.json"}, "held": {"file_name": "held.json"}}
    return make_dataset_dir(info, {"nums.json": _records(20), "held.json": _records(3)})


def test_val_split_is_deterministic_and_disjoint(numbers_dir, tokenizer):
    data = DataArgs(dataset=["nums"], dataset_dir=str(numbers_dir), template="chatml", val_size=0.25)
    first = build_datasets(data, tokenizer, seed=7)
    again = build_datasets(data, tokenizer, seed=7)
    other = build_datasets(data, tokenizer, seed=8)
    assert (len(first.train), len(first.eval), len(first.eval_examples)) == (15, 5, 5)
    assert first == again
    assert [e.reference for e in first.eval_examples] != [e.reference for e in other.eval_examples]
    assert not {tuple(e.input_ids) for e in first.train} & {tuple(e.input_ids) for e in first.eval}


def test_val_size_as_a_count_and_eval_dataset_instead_of_a_split(numbers_dir, tokenizer):
    counted = build_datasets(
        DataArgs(dataset=["nums"], dataset_dir=str(numbers_dir), template="chatml", val_size=4),
        tokenizer,
        seed=0,
    )
    assert (len(counted.train), len(counted.eval)) == (16, 4)
    separate = build_datasets(
        DataArgs(dataset=["nums"], eval_dataset=["held"], dataset_dir=str(numbers_dir), template="chatml"),
        tokenizer,
        seed=0,
    )
    assert (len(separate.train), len(separate.eval)) == (20, 3)
    assert [e.reference for e in separate.eval_examples] == ["001", "101", "201"]


def test_dataset_dir_is_relative_to_base_dir(numbers_dir, tokenizer):
    data = DataArgs(dataset=["nums"], dataset_dir=numbers_dir.name, max_samples=5)
    splits = build_datasets(data, tokenizer, seed=0, base_dir=numbers_dir.parent)
    assert (len(splits.train), len(splits.eval)) == (5, 0)


def test_val_size_leaving_nothing_to_train(numbers_dir, tokenizer):
    with pytest.raises(DatasetError, match="leaving none to train on"):
        build_datasets(
            DataArgs(dataset=["nums"], dataset_dir=str(numbers_dir), val_size=20), tokenizer, seed=0
        )


def test_bad_records_of_train_and_eval_and_truncation_reported_together(make_dataset_dir, tokenizer):
    train = (
        '[\n{"instruction": "reverse " , "input": "'
        + "9 " * 40
        + '", "output": "12345"},\n{"instruction": "x"}\n]'
    )
    held = '{"instruction": "y", "output": 1}\n'
    info = {"t": {"file_name": "t.json"}, "e": {"file_name": "e.jsonl"}}
    dataset_dir = make_dataset_dir(info, {"t.json": train, "e.jsonl": held})
    data = DataArgs(
        dataset=["t"], eval_dataset=["e"], dataset_dir=str(dataset_dir), template="chatml", cutoff_len=12
    )
    with pytest.raises(DatasetError) as exc:
        build_datasets(data, tokenizer, seed=0)
    message = str(exc.value)
    assert message.startswith("3 bad records")
    assert f"{dataset_dir / 'e.jsonl'}:1: 'output' must be a string" in message
    assert f"{dataset_dir / 't.json'}:2: no response token left after truncation" in message
    assert f"{dataset_dir / 't.json'}:3: missing 'output'" in message


def test_exact_match_normalises_whitespace():
    assert exact_match(" 4 2\n", "4 2")
    assert exact_match("42", "42")
    assert not exact_match("42", "4 2")
    assert not exact_match("421", "42")


def test_demo_files_are_what_the_generator_writes(tmp_path):
    write_demo_datasets(tmp_path)
    committed = sorted(p.name for p in DEMO_DIR.iterdir())
    assert committed == sorted(p.name for p in tmp_path.iterdir())
    for name in committed:
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name


def test_demo_datasets_load_and_eval_is_held_out():
    names = ["demo_tasks", "demo_tasks_eval", "demo_sharegpt", "identity"]
    train, held, sharegpt, identity = (load_examples([name], DEMO_DIR) for name in names)
    assert (len(train), len(held)) == (4000, 200)
    assert not {json.dumps(e.messages) for e in train} & {json.dumps(e.messages) for e in held}
    assert all(len(e.messages) == 4 for e in sharegpt)
    assert identity[0].messages[0]["role"] == "system"
