"""Batch encoded examples into padded tensors, and choose what of a batch the model is given."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clusterft.data.preprocess import IGNORE_INDEX, EncodedExample

if TYPE_CHECKING:
    import torch


def collate(examples: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels and attention_mask, each (batch, longest), right-padded; and position_ids
    when the examples are neat-packed rows.

    Padding has attention_mask 0 and label -100, so it neither attends nor is trained on. Its
    position ids restart at 0: to the packed-sequence mask it is one more sequence of its own.
    """
    import torch

    longest = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    packed = examples[0].position_ids is not None
    position_ids = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
        if packed:
            assert example.position_ids is not None, "a batch is all neat-packed rows or none"
            position_ids[row, :length] = torch.tensor(example.position_ids, dtype=torch.long)
            position_ids[row, length:] = torch.arange(longest - length)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments of the model's forward for a `collate` batch.

    Neat-packed rows are given position ids and no attention mask (and no KV cache): that is the
    input from which transformers derives a block-diagonal causal mask, one block per example
    (masking_utils.find_packed_sequence_indices). Anything else: input ids and the padding mask.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
