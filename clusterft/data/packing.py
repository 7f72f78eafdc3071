"""`packing: true`: encoded examples concatenated into sequences of at most `cutoff_len` tokens.

    packed row:   [ example a ........ | example b .... | example c .. ]   <= cutoff_len
    labels:       [ -100 a_1 ... a_n   | -100 b_1 ...   | -100 c_1 ...  ]
    position_ids: [ 0 1 2 ...          | 0 1 2 ...      | 0 1 ...       ]   (neat_packing only)

Packing is greedy in data order: an example joins the current row if it fits, else the row is
closed and a new one starts. So the packed rows are a pure function of the encoded examples, in
the same order every time; a run's data position (epoch, micro-step over packed rows) therefore
resumes exactly, and a streaming build packs as it reads, one row held at a time.

Each example's first label is -100 in the packed row: its first token would otherwise be the target
of the previous example's last token, a prediction across examples that training on the examples
one by one never makes (there, the first label is shifted away). With `neat_packing` the position
ids restart at 0 per example; the model is then given position ids and no attention mask, from
which transformers builds a block-diagonal causal mask, so no token attends to another example.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from clusterft.data.preprocess import IGNORE_INDEX, EncodedExample


class Packer:
    """Greedy, order-preserving packing; feed examples with `add`, then `finish`."""

    def __init__(self, cutoff_len: int, *, neat: bool):
        self.cutoff_len = cutoff_len
        self.neat = neat
        self._input_ids: list[int] = []
        self._labels: list[int] = []
        self._position_ids: list[int] = []

    def add(self, example: EncodedExample) -> EncodedExample | None:
        """Add `example`; return the row it closed, if it did not fit in the current one."""
        assert len(example.input_ids) <= self.cutoff_len, "encoding truncates to cutoff_len"
        closed = None
        if self._input_ids and len(self._input_ids) + len(example.input_ids) > self.cutoff_len:
            closed = self.finish()
        self._input_ids += example.input_ids
        self._labels += [IGNORE_INDEX, *example.labels[1:]]
        self._position_ids += range(len(example.input_ids))
        return closed

    def finish(self) -> EncodedExample | None:
        """The row being filled (None when empty); the packer starts a new one."""
        if not self._input_ids:
            return None
        row = EncodedExample(
            input_ids=self._input_ids,
            labels=self._labels,
            position_ids=self._position_ids if self.neat else None,
        )
        self._input_ids, self._labels, self._position_ids = [], [], []
        return row


def pack_examples(
    examples: Iterable[EncodedExample], cutoff_len: int, *, neat: bool
) -> Iterator[EncodedExample]:
    """Packed rows of `examples`, lazily (a streaming build never holds more than one row)."""
    packer = Packer(cutoff_len, neat=neat)
    for example in examples:
        row = packer.add(example)
        if row is not None:
            yield row
    last = packer.finish()
    if last is not None:
        yield last
