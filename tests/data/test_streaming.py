"""streaming: JSON Lines read a line at a time (memory bounded by a chunk, not the file), the held-out
split is the first val_size examples, and the data position is a cursor that seeks into the
block-shuffled order without replaying it."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from clusterft.config.spec import DataArgs
from clusterft.data import DatasetError, EpochBatchSampler, build_datasets, builder, load_examples, table


def _jsonl(count: int) -> str:
    return "".join(
        json.dumps({"instruction": "reverse", "input": str(10**5 + i), "output": str(10**5 + i)[::-1]}) + "\n"
        for i in range(count)
    )


@pytest.fixture
def stream_dir(make_dataset_dir) -> Path:
    return make_dataset_dir({"nums": {"file_name": "nums.jsonl"}}, {"nums.jsonl": _jsonl(200)})


def _data(stream_dir: Path, **options) -> DataArgs:
    return DataArgs(dataset=["nums"], dataset_dir=str(stream_dir), template="chatml", **options)


def test_streamed_rows_are_the_file_order_and_eval_is_the_first_val_size(stream_dir, tokenizer, tmp_path):
    streamed = build_datasets(_data(stream_dir, streaming=True, val_size=5), tokenizer, seed=0,
                              default_cache_dir=tmp_path)  # fmt: skip
    whole = build_datasets(_data(stream_dir, eval_dataset=["nums"], max_samples=5), tokenizer, seed=0)
    assert streamed.eval == whole.eval and [e.line for e in streamed.eval_examples] == [1, 2, 3, 4, 5]
    everything = build_datasets(_data(stream_dir), tokenizer, seed=0).train
    assert streamed.train == everything[5:]
    assert streamed.train.shuffle_block == 16384 and everything.shuffle_block is None


def test_streaming_refuses_a_json_list_and_a_fractional_val_size(make_dataset_dir, stream_dir, tokenizer):
    with pytest.raises(DatasetError, match="val_size must be a whole number"):
        build_datasets(_data(stream_dir, streaming=True, val_size=0.1), tokenizer, seed=0)
    listed = make_dataset_dir(
        {"nums": {"file_name": "nums.json"}}, {"nums.json": json.dumps([{"output": "1"}])}
    )
    with pytest.raises(
        DatasetError, match=r"is a JSON list; convert it \(jq -c '.\[\]' nums.json > nums.jsonl\)"
    ):
        build_datasets(_data(listed, streaming=True), tokenizer, seed=0)


def test_a_streamed_build_holds_a_chunk_not_the_file(make_dataset_dir, tokenizer, tmp_path, monkeypatch):
    """Peak Python memory while building the cache grows with the file without streaming and stays
    at one chunk with it (chunks of 500 rows here): from 1,000 to 5,000 records."""
    monkeypatch.setattr(builder, "BATCH_ROWS", 500)
    monkeypatch.setattr(table, "BATCH_ROWS", 500)
    peaks = {}
    for count in (1_000, 5_000):
        files = {"nums.jsonl": _jsonl(count)}
        data_dir = make_dataset_dir({"nums": {"file_name": "nums.jsonl"}}, files)
        for streaming in (False, True):
            tracemalloc.start()
            splits = build_datasets(_data(data_dir, streaming=streaming), tokenizer, seed=0,
                                    default_cache_dir=tmp_path / f"{count}-{streaming}")  # fmt: skip
            peaks[count, streaming] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert len(splits.train) == count
    growth = {streaming: peaks[5_000, streaming] - peaks[1_000, streaming] for streaming in (False, True)}
    assert growth[True] < growth[False] / 4, peaks


def _sampler(n: int, batch: int, world: int, rank: int, block: int) -> EpochBatchSampler:
    return EpochBatchSampler(
        n, micro_batch_size=batch, world_size=world, rank=rank, seed=4, shuffle_block=block
    )


def test_the_cursor_seeks_into_the_block_order_without_replaying_it():
    n, block, batch, world = 103, 10, 3, 2  # 10 full blocks and a tail of 3
    samplers = [_sampler(n, batch, world, r, block) for r in range(world)]
    order = samplers[0].epoch_order(0)
    assert sorted(order) == list(range(n)) and order != samplers[0].epoch_order(1)
    # blocks of consecutive rows, visited whole, the tail last
    assert [sorted({i // block for i in order[k : k + block]}) for k in range(0, 100, block)] == [
        [order[k] // block] for k in range(0, 100, block)
    ]
    assert sorted(order[100:]) == [100, 101, 102]
    steps = samplers[0].micro_steps_per_epoch()
    assert steps == n // (batch * world)
    uninterrupted = [[i for s in samplers for i in s.batch(e, k)] for e in range(2) for k in range(steps)]
    assert uninterrupted[:steps] == [order[k * 6 : k * 6 + 6] for k in range(steps)]
    # a "restarted" worker group, asked for (epoch 1, micro_step 5) first: the same rows follow
    fresh = [_sampler(n, batch, world, r, block) for r in range(world)]
    resumed = [[i for s in fresh for i in s.batch(1, k)] for k in range(5, steps)]
    assert resumed == uninterrupted[steps + 5 :]


def test_streaming_reports_every_bad_line_like_the_whole_file_reader(make_dataset_dir, tokenizer):
    text = _jsonl(3) + "{oops\n" + json.dumps({"instruction": "x"}) + "\n" + _jsonl(2)
    data_dir = make_dataset_dir({"nums": {"file_name": "nums.jsonl"}}, {"nums.jsonl": text})
    with pytest.raises(DatasetError) as whole:
        load_examples(["nums"], data_dir)
    with pytest.raises(DatasetError) as streamed:
        build_datasets(_data(data_dir, streaming=True), tokenizer, seed=0)
    assert str(streamed.value) == str(whole.value)
