"""The tokenized-dataset cache: built once, keyed by what changes the rows, memory-mapped on read,
safe against concurrent builders, and rebuilt (with a warning that says why) when damaged."""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from clusterft.config.spec import DataArgs
from clusterft.data import DatasetError, build_datasets
from clusterft.data import builder as builder_module
from clusterft.data import cache as cache_module
from clusterft.data.cache import (
    EVAL,
    EVAL_EXAMPLES,
    META,
    TRAIN,
    VERIFIED,
    CorruptCache,
    cache_inputs,
    cache_key,
    check_entry,
    new_build_dir,
    publish,
)

NUM_RECORDS = 300


def _jsonl(count: int, offset: int = 0) -> str:
    return "".join(
        json.dumps({"instruction": "reverse", "input": str(1000 + i), "output": str(1000 + i)[::-1]}) + "\n"
        for i in range(offset, offset + count)
    )


@pytest.fixture
def nums_dir(make_dataset_dir) -> Path:
    return make_dataset_dir({"nums": {"file_name": "nums.jsonl"}}, {"nums.jsonl": _jsonl(NUM_RECORDS)})


def _data(nums_dir: Path, **options) -> DataArgs:
    options = {"template": "chatml", "val_size": 10, **options}
    return DataArgs(dataset=["nums"], dataset_dir=str(nums_dir), **options)


def _entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def test_cached_splits_equal_the_in_memory_build_and_a_hit_tokenizes_nothing(
    nums_dir, tokenizer, tmp_path, monkeypatch
):
    cache_dir = tmp_path / "cache"
    data = _data(nums_dir)
    in_memory = build_datasets(data, tokenizer, seed=3)
    built = build_datasets(data, tokenizer, seed=3, default_cache_dir=cache_dir)
    assert built == in_memory
    assert len(built.train) == NUM_RECORDS - 10
    (key,) = _entries(cache_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(builder_module, "encode_data", refuse)
    hit = build_datasets(data, tokenizer, seed=3, default_cache_dir=cache_dir)
    assert hit == in_memory and _entries(cache_dir) == [key]


def test_data_cache_dir_wins_over_the_default_and_is_relative_to_base_dir(nums_dir, tokenizer, tmp_path):
    build_datasets(
        _data(nums_dir, cache_dir="shared"),
        tokenizer,
        seed=0,
        base_dir=tmp_path,
        default_cache_dir=tmp_path / "x",
    )
    assert len(_entries(tmp_path / "shared")) == 1 and not (tmp_path / "x").exists()


def test_rows_are_memory_mapped_not_copied(nums_dir, tokenizer, tmp_path):
    cache_dir = tmp_path / "cache"
    data = _data(nums_dir)
    build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir)
    allocated = pa.total_allocated_bytes()
    train = build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir).train
    assert sum(len(example.input_ids) for example in train) > 0
    # Arrow allocated nothing for the rows: every buffer lies in the mapped file.
    assert pa.total_allocated_bytes() == allocated
    in_memory = build_datasets(data, tokenizer, seed=0).train  # the contrast: a built table allocates
    assert pa.total_allocated_bytes() > allocated and len(in_memory) == len(train)


@pytest.mark.parametrize(
    "change",
    ["cutoff_len", "template", "file_content", "file_mtime", "packing", "tokenizer", "seed"],
)
def test_the_key_changes_with_what_changes_the_rows(change, nums_dir, tokenizer, tmp_path):
    cache_dir = tmp_path / "cache"
    data, seed, tok = _data(nums_dir), 0, tokenizer
    first = build_datasets(data, tok, seed=seed, default_cache_dir=cache_dir)
    if change == "cutoff_len":
        data = _data(nums_dir, cutoff_len=7)
    elif change == "template":
        data = DataArgs(**{**data.model_dump(), "template": "default"})
    elif change == "packing":
        data = _data(nums_dir, packing=True)
    elif change == "file_content":  # same size, one digit changed
        path = nums_dir / "nums.jsonl"
        path.write_text(path.read_text().replace("1000", "1009", 1))
    elif change == "file_mtime":
        path = nums_dir / "nums.jsonl"
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    elif change == "tokenizer":
        tok = _shifted_tokenizer(tokenizer, tmp_path)
    elif change == "seed":  # picks the val_size split
        seed = 1
    second = build_datasets(data, tok, seed=seed, default_cache_dir=cache_dir)
    assert len(_entries(cache_dir)) == 2
    if change not in ("file_mtime", "tokenizer"):  # those two change the key, not these rows
        assert second != first


def _shifted_tokenizer(tokenizer, tmp_path: Path):
    """The same tokenizer with one more special token: a different tokenizer hash."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    other = AutoTokenizer.from_pretrained(tmp_path / "tok")
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    return other


def test_buffer_size_and_worker_count_do_not_change_the_key(nums_dir, tokenizer, tmp_path):
    cache_dir = tmp_path / "cache"
    build_datasets(_data(nums_dir, streaming=True), tokenizer, seed=0, default_cache_dir=cache_dir)
    build_datasets(
        _data(nums_dir, streaming=True, buffer_size=7, preprocessing_num_workers=2),
        tokenizer,
        seed=0,
        default_cache_dir=cache_dir,
    )
    assert len(_entries(cache_dir)) == 1


def _damage_truncate(entry: Path) -> str:
    path = entry / TRAIN
    path.write_bytes(path.read_bytes()[:-100])
    return "train.arrow has"


def _damage_flip(entry: Path) -> str:
    path = entry / TRAIN
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return "does not match its sha256"


def _damage_meta(entry: Path) -> str:
    (entry / META).unlink()
    return "meta.json is missing"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip, _damage_meta])
def test_a_damaged_entry_is_rebuilt_with_a_warning_naming_the_problem(
    damage, nums_dir, tokenizer, tmp_path, caplog
):
    cache_dir = tmp_path / "cache"
    data = _data(nums_dir)
    build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir)  # mapped, then dropped
    (key,) = _entries(cache_dir)
    reason = damage(cache_dir / key)  # in place: a live map of the file would see it (or SIGBUS)
    with caplog.at_level(logging.WARNING, logger="clusterft.data.cache"):
        again = build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir)
    assert again == build_datasets(data, tokenizer, seed=0)
    assert f"dataset cache {cache_dir / key} is unusable" in caplog.text and reason in caplog.text
    assert _entries(cache_dir) == [key]  # rebuilt in place, nothing left aside


def test_bad_records_publish_nothing(make_dataset_dir, tokenizer, tmp_path):
    text = _jsonl(5) + "{not json\n" + json.dumps({"instruction": "x", "output": ""}) + "\n"
    nums_dir = make_dataset_dir({"nums": {"file_name": "nums.jsonl"}}, {"nums.jsonl": text})
    cache_dir = tmp_path / "cache"
    for streaming in (False, True):
        with pytest.raises(DatasetError, match="2 bad records") as caught:
            build_datasets(_data(nums_dir, val_size=0, streaming=streaming), tokenizer, seed=0,
                           default_cache_dir=cache_dir)  # fmt: skip
        assert "nums.jsonl:6: invalid JSON" in str(caught.value)
        assert _entries(cache_dir) == []


def test_concurrent_builders_publish_one_entry_and_agree(nums_dir, tokenizer, tmp_path):
    """Three builders find no entry and build at once (threads: the race is on the filesystem)."""
    cache_dir = tmp_path / "cache"
    barrier = threading.Barrier(3)

    def build() -> list[list[int]]:
        barrier.wait()
        splits = build_datasets(_data(nums_dir), tokenizer, seed=0, default_cache_dir=cache_dir)
        return [example.input_ids for example in splits.train]

    with ThreadPoolExecutor(3) as pool:
        rows = list(pool.map(lambda _: build(), range(3)))
    expected = [e.input_ids for e in build_datasets(_data(nums_dir), tokenizer, seed=0).train]
    assert rows == [expected] * 3
    assert len(_entries(cache_dir)) == 1  # one published entry, no build directory left behind


def test_a_builder_that_loses_the_race_uses_the_winners_entry(nums_dir, tokenizer, tmp_path):
    cache_dir = tmp_path / "cache"
    data = _data(nums_dir)
    inputs = cache_inputs(data, nums_dir, tokenizer, 0)
    key = cache_key(inputs)
    late, early = new_build_dir(cache_dir, key), new_build_dir(cache_dir, key)
    (early / TRAIN).write_bytes(b"early")
    (late / TRAIN).write_bytes(b"late!")
    winner = publish(early, cache_dir, key, inputs, {})
    assert publish(late, cache_dir, key, inputs, {}) == winner
    assert (cache_dir / key / TRAIN).read_bytes() == b"early" and not late.exists()


def _count_hashes(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = cache_module.sha256_file

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(cache_module, "sha256_file", counting)
    return hashed


def test_a_worker_trusts_the_drivers_full_check_of_unchanged_files(
    nums_dir, tokenizer, tmp_path, monkeypatch
):
    cache_dir = tmp_path / "cache"
    data = _data(nums_dir)
    built = build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir)  # publish hashes
    hashed = _count_hashes(monkeypatch)
    driver = build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir)
    assert sorted(hashed) == sorted([EVAL_EXAMPLES, EVAL, TRAIN])  # the driver always checks in full
    hashed.clear()
    worker = build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir, trust_verified=True)
    assert hashed == [] and worker == driver == built


def _flip_keeping_mtime(entry: Path) -> None:
    path = entry / TRAIN
    before = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: ctime moved


@pytest.mark.parametrize("stamp", ["stale", "lost"])
def test_a_worker_still_refuses_a_file_altered_since_the_check_by_name(
    stamp, nums_dir, tokenizer, tmp_path, caplog
):
    cache_dir = tmp_path / "cache"
    data = _data(nums_dir)
    build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir)
    (key,) = _entries(cache_dir)
    entry = cache_dir / key
    _flip_keeping_mtime(entry)
    if stamp == "lost":
        (entry / VERIFIED).unlink()
    with pytest.raises(CorruptCache, match=r"train\.arrow does not match its sha256"):
        check_entry(entry, key, trust_verified=True)
    with caplog.at_level(logging.WARNING, logger="clusterft.data.cache"):
        again = build_datasets(data, tokenizer, seed=0, default_cache_dir=cache_dir, trust_verified=True)
    assert f"dataset cache {entry} is unusable: train.arrow does not match its sha256" in caplog.text
    assert again == build_datasets(data, tokenizer, seed=0)  # rebuilt
