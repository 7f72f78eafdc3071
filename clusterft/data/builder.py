"""`build_datasets`: from the job's data section to encoded train/eval splits, or one error listing
every bad record, before any training starts.

With a cache directory (`data.cache_dir`, or the run's own that training passes as
`default_cache_dir`) the splits are encoded once, written as Arrow (cache.py) and memory-mapped:
the driver builds the entry in its preflight and every worker finds it and maps it, reading only
the rows of its own batches. Without one they are built into memory (evaluation, preview).

    records ──▶ Examples ──▶ encoded ──▶ packed (packing) ──▶ Arrow record batches ──▶ TokenizedDataset
               (streaming: one JSON line at a time; encoded and packed in chunks of BATCH_ROWS)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from clusterft.data.cache import (
    EVAL,
    EVAL_EXAMPLES,
    TRAIN,
    cache_inputs,
    cache_key,
    find_entry,
    new_build_dir,
    publish,
)
from clusterft.data.errors import BadRecord, raise_bad_records
from clusterft.data.example import Example
from clusterft.data.loader import collect_examples
from clusterft.data.packing import pack_examples
from clusterft.data.preprocess import EncodedExample, EncodeResult, encode_examples
from clusterft.data.split import split_train_eval
from clusterft.data.stream import stream_examples, streamed_eval_count
from clusterft.data.table import BATCH_ROWS, BatchWriter, TokenizedDataset, read_table_file, schema_for
from clusterft.data.template import get_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clusterft.config.spec import DataArgs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSplits:
    train: TokenizedDataset
    eval: list[EncodedExample]
    eval_examples: list[Example]  # raw held-out examples, aligned with `eval` (for exact-match generation)


def resolve_dataset_dir(dataset_dir: str | Path, base_dir: str | Path | None = None) -> Path:
    """`dataset_dir` relative to `base_dir` (default: the working directory); absolute stays as is."""
    return Path(base_dir if base_dir is not None else Path.cwd()) / dataset_dir


def encode_data(
    data: DataArgs,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    *,
    num_workers: int | None = None,
) -> EncodeResult:
    """Encode `examples` with the template, cutoff and masking options of `data`."""
    return encode_examples(
        examples,
        get_template(data.template, tokenizer),
        tokenizer,
        cutoff_len=data.cutoff_len,
        train_on_prompt=data.train_on_prompt,
        mask_history=data.mask_history,
        num_workers=data.preprocessing_num_workers if num_workers is None else num_workers,
    )


def build_datasets(
    data: DataArgs,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    base_dir: str | Path | None = None,
    default_cache_dir: str | Path | None = None,
    trust_verified: bool = False,
) -> DatasetSplits:
    """Load, check, split, encode (and pack) the datasets of `data`, through the cache if there is one.

    The eval split is `eval_dataset` when given, else `val_size` of `dataset` held out by a shuffle
    seeded with `seed` (streaming: the first `val_size` examples). Every bad record (unreadable,
    malformed, or nothing to train on after truncation) of train and eval is reported in one
    DatasetError, and nothing is cached. `trust_verified`: a cached entry unchanged since its last
    full check is not hashed again (a training worker, whose driver just checked it: cache.py).
    """
    dataset_dir = resolve_dataset_dir(data.dataset_dir, base_dir)
    cache_dir = resolve_dataset_dir(data.cache_dir, base_dir) if data.cache_dir else default_cache_dir
    if cache_dir is None:
        sink = pa.BufferOutputStream()
        _, eval_encoded, eval_examples = _write_splits(data, tokenizer, seed, dataset_dir, sink)
        reader = pa.ipc.open_file(sink.getvalue())
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        return DatasetSplits(
            TokenizedDataset(batches, shuffle_block=_shuffle_block(data)), eval_encoded, eval_examples
        )

    cache_dir = Path(cache_dir)
    inputs = cache_inputs(data, dataset_dir, tokenizer, seed)
    key = cache_key(inputs)
    entry = find_entry(cache_dir, key, trust_verified=trust_verified)
    if entry is None:
        started = time.perf_counter()
        build_dir = new_build_dir(cache_dir, key)
        try:
            num_train, eval_encoded, eval_examples = _write_splits(
                data, tokenizer, seed, dataset_dir, build_dir / TRAIN
            )
            _write_eval(build_dir, eval_encoded, eval_examples)
            entry = publish(build_dir, cache_dir, key, inputs, {TRAIN: num_train, EVAL: len(eval_encoded)})
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)  # gone already when published
        logger.info(
            "tokenized %d training rows into %s in %.1f s",
            num_train,
            entry.path,
            time.perf_counter() - started,
        )
    return _read_entry(entry.path, data)


def _shuffle_block(data: DataArgs) -> int | None:
    return data.buffer_size if data.streaming else None


def _read_entry(path: Path, data: DataArgs) -> DatasetSplits:
    train = read_table_file(path / TRAIN, shuffle_block=_shuffle_block(data))
    evaluation = list(read_table_file(path / EVAL))
    with open(path / EVAL_EXAMPLES, encoding="utf-8") as handle:
        eval_examples = [Example(**json.loads(line)) for line in handle]
    return DatasetSplits(train=train, eval=evaluation, eval_examples=eval_examples)


def _write_eval(build_dir: Path, encoded: list[EncodedExample], examples: list[Example]) -> None:
    writer = BatchWriter(build_dir / EVAL, schema_for(False))
    writer.write(encoded)
    writer.close()
    with open(build_dir / EVAL_EXAMPLES, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(asdict(example)) + "\n" for example in examples)


def _write_splits(
    data: DataArgs,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    dataset_dir: Path,
    train_sink: Path | pa.NativeFile,
) -> tuple[int, list[EncodedExample], list[Example]]:
    """Write the training rows to `train_sink` (an Arrow IPC file); return their number and the eval
    split."""
    problems: list[BadRecord] = []
    if data.streaming:
        train_encoded, eval_encoded, eval_examples = _streamed_splits(data, tokenizer, dataset_dir, problems)
    else:
        train_encoded, eval_encoded, eval_examples = _loaded_splits(
            data, tokenizer, seed, dataset_dir, problems
        )
    packing = data.packing or data.neat_packing
    rows = pack_examples(train_encoded, data.cutoff_len, neat=data.neat_packing) if packing else train_encoded
    writer = BatchWriter(train_sink, schema_for(data.neat_packing))
    try:
        writer.write(rows)
    finally:
        writer.close()
    raise_bad_records(problems)  # a streamed build meets them on the way: nothing is published
    return writer.num_rows, eval_encoded, eval_examples


def _loaded_splits(
    data: DataArgs,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    dataset_dir: Path,
    problems: list[BadRecord],
) -> tuple[Iterable[EncodedExample], list[EncodedExample], list[Example]]:
    """Every record in memory at once: the split shuffles over all of them."""
    examples, read_problems = collect_examples(data.dataset, dataset_dir, max_samples=data.max_samples)
    problems += read_problems
    if data.eval_dataset:
        train_examples = examples
        eval_examples, eval_problems = collect_examples(
            data.eval_dataset, dataset_dir, max_samples=data.max_samples
        )
        problems += eval_problems
    else:
        train_examples, eval_examples = split_train_eval(examples, data.val_size, seed)
    train = encode_data(data, tokenizer, train_examples)
    evaluation = encode_data(data, tokenizer, eval_examples)
    problems += train.problems + evaluation.problems
    raise_bad_records(problems)
    return train.encoded, evaluation.encoded, evaluation.examples


def _streamed_splits(
    data: DataArgs, tokenizer: PreTrainedTokenizerBase, dataset_dir: Path, problems: list[BadRecord]
) -> tuple[Iterator[EncodedExample], list[EncodedExample], list[Example]]:
    """The training examples as a lazy stream (encoded BATCH_ROWS at a time); eval in memory."""
    stream = stream_examples(data.dataset, dataset_dir, problems, max_samples=data.max_samples)
    if data.eval_dataset:
        held_out = list(
            stream_examples(data.eval_dataset, dataset_dir, problems, max_samples=data.max_samples)
        )
    else:
        held_out = list(islice(stream, streamed_eval_count(data.val_size)))
    evaluation = encode_data(data, tokenizer, held_out, num_workers=1)
    problems += evaluation.problems

    def encoded_train() -> Iterator[EncodedExample]:
        while chunk := list(islice(stream, BATCH_ROWS)):
            result = encode_data(data, tokenizer, chunk, num_workers=1)
            problems.extend(result.problems)
            yield from result.encoded

    return encoded_train(), evaluation.encoded, evaluation.examples
