"""A deterministic, resumable data order for data-parallel training.

    epoch e:  permutation of range(num_examples), seeded by (seed, e)
              |<-- micro-step 0: G -->|<-- micro-step 1: G -->| ... | dropped tail (< G) |
    one slice: | rank 0: B | rank 1: B | ... |            G = B * world_size

Because a micro-step's global slice does not depend on how it is divided among ranks, a run saved
at (epoch, micro_step) on 4 workers with B=2 resumes on 1 worker with B=8 and sees the same data.
The position is two integers that a checkpoint stores; nothing else needs saving.

Streaming (`shuffle_block` = S, the data's `buffer_size`): a permutation of every row would touch
the whole file each epoch and hold num_examples indices. Instead the rows are cut into blocks of S
consecutive rows; an epoch visits the full blocks in a seeded order and the rows of each block in a
seeded order, the tail block (< S rows) last:

    epoch e:  | block 7: rows shuffled | block 2: rows shuffled | ... | tail block |

A reader then works through one block (S consecutive rows of the Arrow file) at a time, and the
index at any position is computed in O(S) without replaying the epoch: the same (epoch, micro_step)
cursor resumes a streaming run exactly.
"""

from __future__ import annotations

import random

from clusterft.data.errors import DatasetError


class EpochBatchSampler:
    """Resumable, deterministic data order for data-parallel training.

    Epoch e's global order is a permutation of range(num_examples) seeded by (seed, e). Micro-step k of
    epoch e takes the global slice [k*G, (k+1)*G) with G = micro_batch_size * world_size; rank r gets the
    contiguous chunk [r*B, (r+1)*B) of that slice (B = micro_batch_size), so one worker with B*world_size
    sees exactly the same global batches (this is what lets a run resume on a different worker count).
    drop_last: an incomplete final slice is dropped.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        shuffle_block: int | None = None,
    ):
        if micro_batch_size <= 0 or world_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} and world_size={world_size} must be > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        if shuffle_block is not None and shuffle_block <= 0:
            raise ValueError(f"shuffle_block={shuffle_block} must be > 0")
        global_batch_size = micro_batch_size * world_size
        if num_examples < global_batch_size:
            raise DatasetError(
                f"{num_examples} training examples cannot fill one global batch of {global_batch_size} "
                f"(per_device_train_batch_size={micro_batch_size} × {world_size} workers); "
                "lower the batch size or the number of workers, or add data"
            )
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle_block = shuffle_block
        self._cached_epoch: int | None = None
        self._cached_order: list[int] = []
        self._cached_block: tuple[int, int] | None = None
        self._cached_rows: list[int] = []

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    def micro_steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of epoch `epoch` (cached: consecutive calls are for the same epoch)."""
        if self.shuffle_block is not None:  # streaming: computed position by position, never held whole
            return [self._streamed_index(epoch, p) for p in range(self.num_examples)]
        if epoch != self._cached_epoch:
            order = list(range(self.num_examples))
            # A string seed is hashed with SHA-512 by `random`: stable across runs and Python versions.
            random.Random(f"clusterft-sampler:{self.seed}:{epoch}").shuffle(order)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def _block_order(self, epoch: int) -> list[int]:
        """The order in which epoch `epoch` visits the full blocks (cached like epoch_order)."""
        assert self.shuffle_block is not None
        if epoch != self._cached_epoch:
            order = list(range(self.num_examples // self.shuffle_block))
            random.Random(f"clusterft-blocks:{self.seed}:{epoch}").shuffle(order)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def _streamed_index(self, epoch: int, position: int) -> int:
        """The row at `position` of epoch `epoch`'s block-shuffled order."""
        size = self.shuffle_block
        assert size is not None
        full_blocks = self.num_examples // size
        rank_in_epoch, offset = divmod(position, size)
        block = self._block_order(epoch)[rank_in_epoch] if rank_in_epoch < full_blocks else full_blocks
        if self._cached_block != (epoch, block):
            rows = list(range(block * size, min((block + 1) * size, self.num_examples)))
            random.Random(f"clusterft-block:{self.seed}:{epoch}:{block}").shuffle(rows)
            self._cached_block, self._cached_rows = (epoch, block), rows
        return self._cached_rows[offset]

    def global_batch(self, epoch: int, micro_step: int) -> list[int]:
        """Indices of micro-step `micro_step` of epoch `epoch`, all ranks together (rank order)."""
        if not 0 <= micro_step < self.micro_steps_per_epoch():
            raise IndexError(f"micro_step={micro_step} outside [0, {self.micro_steps_per_epoch()})")
        start = micro_step * self.global_batch_size
        if self.shuffle_block is not None:
            return [self._streamed_index(epoch, p) for p in range(start, start + self.global_batch_size)]
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def batch(self, epoch: int, micro_step: int) -> list[int]:
        """This rank's indices of micro-step `micro_step` of epoch `epoch`."""
        start = self.rank * self.micro_batch_size
        return self.global_batch(epoch, micro_step)[start : start + self.micro_batch_size]
