"""Batch encoded examples into padded tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clusterft.data.preprocess import IGNORE_INDEX, EncodedExample

if TYPE_CHECKING:
    import torch


def collate(examples: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels and attention_mask, each (batch, longest), right-padded.

    Padding has attention_mask 0 and label -100, so it neither attends nor is trained on.
    """
    import torch

    longest = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
