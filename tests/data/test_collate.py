from __future__ import annotations

import torch

from clusterft.data import EncodedExample, collate


def test_right_padding_to_the_longest():
    batch = collate(
        [EncodedExample([5, 6, 7], [-100, 6, 7]), EncodedExample([8], [8])],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
