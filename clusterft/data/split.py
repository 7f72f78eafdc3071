"""The held-out split: `val_size` examples chosen by a seeded shuffle, the same on every run."""

from __future__ import annotations

import math
import random
from typing import TypeVar

from clusterft.data.errors import DatasetError

T = TypeVar("T")


def num_eval_examples(val_size: float, num_examples: int) -> int:
    """How many of `num_examples` `val_size` holds out: a fraction (< 1, rounded up as HF `datasets`
    does) or a count (≥ 1, a whole number)."""
    if val_size <= 0:
        return 0
    if val_size < 1:
        count = math.ceil(val_size * num_examples)
    elif val_size == int(val_size):
        count = int(val_size)
    else:
        raise DatasetError(f"val_size={val_size}: a count of examples must be a whole number (or use < 1)")
    if count >= num_examples:
        raise DatasetError(
            f"val_size={val_size} holds out {count} of {num_examples} examples, leaving none to train on; "
            "lower val_size"
        )
    return count


def split_train_eval(items: list[T], val_size: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): eval is `val_size` items picked by a shuffle seeded with `seed`; both keep the
    file order (the training sampler shuffles anyway, and a stable eval order reads better)."""
    count = num_eval_examples(val_size, len(items))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    train = [item for index, item in enumerate(items) if index not in held_out]
    evaluation = [item for index, item in enumerate(items) if index in held_out]
    return train, evaluation
