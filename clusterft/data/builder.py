"""`build_datasets`: from the job's data section to encoded train/eval splits, or one error listing
every bad record, before any training starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clusterft.data.errors import raise_bad_records
from clusterft.data.example import Example
from clusterft.data.loader import collect_examples
from clusterft.data.preprocess import EncodedExample, EncodeResult, encode_examples
from clusterft.data.split import split_train_eval
from clusterft.data.template import get_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clusterft.config.spec import DataArgs


@dataclass(frozen=True)
class DatasetSplits:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    eval_examples: list[Example]  # raw held-out examples, aligned with `eval` (for exact-match generation)


def resolve_dataset_dir(dataset_dir: str | Path, base_dir: str | Path | None = None) -> Path:
    """`dataset_dir` relative to `base_dir` (default: the working directory); absolute stays as is."""
    return Path(base_dir if base_dir is not None else Path.cwd()) / dataset_dir


def encode_data(data: DataArgs, tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> EncodeResult:
    """Encode `examples` with the template, cutoff and masking options of `data`."""
    return encode_examples(
        examples,
        get_template(data.template, tokenizer),
        tokenizer,
        cutoff_len=data.cutoff_len,
        train_on_prompt=data.train_on_prompt,
        mask_history=data.mask_history,
        num_workers=data.preprocessing_num_workers,
    )


def build_datasets(
    data: DataArgs, tokenizer: PreTrainedTokenizerBase, *, seed: int, base_dir: str | Path | None = None
) -> DatasetSplits:
    """Load, check, split and encode the datasets of `data`.

    The eval split is `eval_dataset` when given, else `val_size` of `dataset` held out by a shuffle
    seeded with `seed`. Every bad record (unreadable, malformed, or nothing to train on after
    truncation) of train and eval is reported in one DatasetError.
    """
    dataset_dir = resolve_dataset_dir(data.dataset_dir, base_dir)
    examples, problems = collect_examples(data.dataset, dataset_dir, max_samples=data.max_samples)
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
    raise_bad_records(problems + train.problems + evaluation.problems)
    return DatasetSplits(train=train.encoded, eval=evaluation.encoded, eval_examples=evaluation.examples)
