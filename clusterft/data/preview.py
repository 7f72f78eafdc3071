"""`preview`: what the model will be trained on, as text, with the trained-on tokens marked.

    <|im_start|>user
    reverse
    123<|im_end|>
    <|im_start|>assistant
    [[321<|im_end|>]]

The CLI's `clusterft data preview JOB.yaml -n 3` prints it; colour replaces the brackets on a TTY.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from clusterft.data.builder import encode_data, resolve_dataset_dir
from clusterft.data.errors import format_bad_records
from clusterft.data.loader import collect_examples
from clusterft.data.preprocess import IGNORE_INDEX, EncodedExample
from clusterft.data.split import split_train_eval

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clusterft.config.spec import DataArgs

_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


def mark_trained(encoded: EncodedExample, tokenizer: PreTrainedTokenizerBase, *, color: bool = False) -> str:
    """The decoded example with each run of trained-on tokens in [[ ]] (or green when `color`)."""
    parts = []
    pairs = zip(encoded.input_ids, encoded.labels, strict=True)
    for trained, run in groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        if trained:
            text = f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
        parts.append(text)
    return "".join(parts)


def preview(
    data: DataArgs,
    tokenizer: PreTrainedTokenizerBase,
    n: int = 3,
    base_dir: str | Path | None = None,
    *,
    seed: int = 42,
    color: bool = False,
) -> str:
    """The first `n` training examples rendered with the trained-on part marked, then counts.

    Unlike `build_datasets`, bad records do not raise: they are listed at the end, so one preview
    shows everything that needs fixing.
    """
    dataset_dir = resolve_dataset_dir(data.dataset_dir, base_dir)
    examples, problems = collect_examples(data.dataset, dataset_dir, max_samples=data.max_samples)
    if data.eval_dataset:
        eval_examples, eval_problems = collect_examples(
            data.eval_dataset, dataset_dir, max_samples=data.max_samples
        )
        problems += eval_problems
    else:
        examples, eval_examples = split_train_eval(examples, data.val_size, seed)
    train = encode_data(data, tokenizer, examples)
    evaluation = encode_data(data, tokenizer, eval_examples)
    problems += train.problems + evaluation.problems

    lines = [
        f"datasets: {', '.join(data.dataset)} ({dataset_dir}) · template: {data.template} · "
        f"cutoff_len: {data.cutoff_len}"
    ]
    for index, (example, encoded) in enumerate(zip(train.examples[:n], train.encoded[:n], strict=True)):
        num_trained = sum(label != IGNORE_INDEX for label in encoded.labels)
        lines.append(
            f"── example {index + 1} · {example.location} · "
            f"{len(encoded.input_ids)} tokens, {num_trained} trained"
        )
        lines.append(mark_trained(encoded, tokenizer, color=color))
    all_encoded = train.encoded + evaluation.encoded
    num_tokens = sum(len(e.input_ids) for e in all_encoded)
    num_trained = sum(label != IGNORE_INDEX for e in all_encoded for label in e.labels)
    longest = max((len(e.input_ids) for e in all_encoded), default=0)
    lines.append(
        f"examples: {len(all_encoded)} (train {len(train.encoded)}, eval {len(evaluation.encoded)}) · "
        f"tokens: {num_tokens} (trained {num_trained}) · longest: {longest} · "
        f"truncated: {train.num_truncated + evaluation.num_truncated}"
    )
    if problems:
        lines += [f"bad records: {len(problems)}", *format_bad_records(problems)]
    return "\n".join(lines)
