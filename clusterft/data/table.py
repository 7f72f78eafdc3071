"""Encoded examples as an Arrow table: written in record batches, read back zero-copy.

    record batch 0            record batch 1            ...
    | input_ids: list<int32> | labels: list<int32> | position_ids: list<int32> (neat packing only) |

A `TokenizedDataset` over a memory-mapped Arrow IPC file holds no copy of the data: each row is
turned into Python lists only when it is read, so a worker's resident memory grows with the rows
it reads (its shard), not with the size of the file.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import pyarrow as pa

from clusterft.data.preprocess import IGNORE_INDEX, EncodedExample

BATCH_ROWS = 4096  # rows per record batch: a streaming reader holds one batch's offsets at a time

_IDS = pa.list_(pa.int32())
PLAIN_SCHEMA = pa.schema([("input_ids", _IDS), ("labels", _IDS)])
PACKED_SCHEMA = pa.schema([("input_ids", _IDS), ("labels", _IDS), ("position_ids", _IDS)])


def schema_for(with_position_ids: bool) -> pa.Schema:
    return PACKED_SCHEMA if with_position_ids else PLAIN_SCHEMA


def to_record_batch(examples: list[EncodedExample], schema: pa.Schema) -> pa.RecordBatch:
    columns = [[getattr(example, name) for example in examples] for name in schema.names]
    return pa.RecordBatch.from_arrays([pa.array(c, type=_IDS) for c in columns], schema=schema)


class BatchWriter:
    """Buffers examples and writes them to an Arrow IPC file sink in record batches of BATCH_ROWS."""

    def __init__(self, sink: str | Path | pa.NativeFile, schema: pa.Schema):
        self.schema = schema
        self._writer = pa.ipc.new_file(sink if isinstance(sink, pa.NativeFile) else str(sink), schema)
        self._pending: list[EncodedExample] = []
        self.num_rows = 0

    def write(self, examples: Iterable[EncodedExample]) -> None:
        for example in examples:
            self._pending.append(example)
            if len(self._pending) == BATCH_ROWS:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(to_record_batch(self._pending, self.schema))
            self.num_rows += len(self._pending)
            self._pending = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


class _BatchView:
    """Zero-copy numpy views of one record batch's list columns (offsets and flat values)."""

    def __init__(self, batch: pa.RecordBatch):
        self.num_rows = batch.num_rows
        self.columns = {
            name: (column.offsets.to_numpy(), column.values.to_numpy())
            for name, column in zip(batch.schema.names, batch.columns, strict=True)
        }

    def row(self, index: int) -> EncodedExample:
        values = {}
        for name, (offsets, flat) in self.columns.items():
            values[name] = flat[offsets[index] : offsets[index + 1]].tolist()
        return EncodedExample(**values)


class TokenizedDataset(Sequence[EncodedExample]):
    """Encoded examples backed by Arrow record batches (memory-mapped or in memory).

    `shuffle_block` is how the data is meant to be ordered: None for a permutation of every row per
    epoch, or a block size for streaming (blocks of consecutive rows, see `EpochBatchSampler`).
    """

    def __init__(self, batches: list[pa.RecordBatch], *, shuffle_block: int | None = None):
        self._views = [_BatchView(batch) for batch in batches if batch.num_rows]
        self._starts = list(np.cumsum([0] + [view.num_rows for view in self._views]))
        self.shuffle_block = shuffle_block
        self.has_position_ids = bool(batches) and "position_ids" in batches[0].schema.names

    @classmethod
    def from_examples(
        cls, examples: list[EncodedExample], *, shuffle_block: int | None = None
    ) -> TokenizedDataset:
        schema = schema_for(bool(examples) and examples[0].position_ids is not None)
        batches = [
            to_record_batch(examples[start : start + BATCH_ROWS], schema)
            for start in range(0, len(examples), BATCH_ROWS)
        ]
        return cls(batches, shuffle_block=shuffle_block)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def label_counts(self) -> list[int]:
        """Per row, the tokens trained on: labels[1:] that are not IGNORE_INDEX (the loss shifts by
        one). Counted over the label column in numpy, never turning a row into Python lists."""
        counts: list[int] = []
        for view in self._views:
            offsets, flat = view.columns["labels"]
            assert (offsets[1:] > offsets[:-1]).all(), "an encoded row has at least one token"
            trained = (flat[offsets[0] : offsets[-1]] != IGNORE_INDEX).astype(np.int64)
            # cumulative sums at the row boundaries give each row's count; minus its first label's
            totals = np.diff(np.concatenate([[0], np.cumsum(trained)])[offsets - offsets[0]])
            counts += (totals - trained[offsets[:-1] - offsets[0]]).tolist()
        return counts

    @overload
    def __getitem__(self, index: int) -> EncodedExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[EncodedExample]: ...

    def __getitem__(self, index: int | slice) -> EncodedExample | list[EncodedExample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} outside a dataset of {len(self)}")
        chunk = bisect.bisect_right(self._starts, index) - 1
        return self._views[chunk].row(index - int(self._starts[chunk]))

    def __iter__(self) -> Iterator[EncodedExample]:
        for view in self._views:
            for row in range(view.num_rows):
                yield view.row(row)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(self) != len(other):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


def read_table_file(path: str | Path, *, shuffle_block: int | None = None) -> TokenizedDataset:
    """Memory-map the Arrow IPC file at `path`: no row is read until it is used."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    return TokenizedDataset(batches, shuffle_block=shuffle_block)
