"""Tokenize conversations into (input_ids, labels) with LLaMA-Factory's truncation and masking.

Each assistant turn is one (prompt_ids, response_ids) pair; the pairs are concatenated and the
labels are the response ids, -100 elsewhere (the loss ignores -100):

    input_ids: [ prompt_1 | response_1 | prompt_2 | response_2 ]
    labels:    [ -100 ... | response_1 | -100 ... | response_2 ]

`train_on_prompt` labels the prompts too; `mask_history` labels only the last response. Truncation
to `cutoff_len` shares the remaining budget between each pair's prompt and response (`infer_seqlen`).
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from clusterft.data.errors import BadRecord
from clusterft.data.example import Example
from clusterft.data.template import ChatTemplate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # same length; -100 where not trained on
    # neat packing only: each packed example's positions, restarting at 0 (see packing.py)
    position_ids: list[int] | None = None


@dataclass(frozen=True)
class EncodeResult:
    """A dataset's encoded examples (aligned with the examples that encoded), and what went wrong."""

    encoded: list[EncodedExample]
    examples: list[Example]
    num_truncated: int
    problems: list[BadRecord]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """(source, target) lengths that fit `cutoff_len`, as LLaMA-Factory computes them.

    A short target is kept whole and the source cut; a short source is kept whole and the target
    cut; when both are long, the budget is shared in proportion to their lengths.
    """
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def encode_pairs_batch(
    conversations: list[list[dict[str, str]]], template: ChatTemplate, tokenizer: PreTrainedTokenizerBase
) -> list[list[tuple[list[int], list[int]]]]:
    """(prompt_ids, response_ids) of each assistant turn, for each conversation. Special tokens in the
    text (`<|im_start|>`) become their single ids; nothing is added around them (the template writes
    any BOS itself). All texts go to the tokenizer in one call: per-call overhead, not the
    tokenizer's own work, is most of the time when each text is encoded alone."""
    turns = [template.turns(messages) for messages in conversations]
    texts = [text for conversation in turns for pair in conversation for text in pair]
    ids = iter(_token_ids(tokenizer, texts))
    return [[(next(ids), next(ids)) for _ in conversation] for conversation in turns]


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """tokenizer(texts, add_special_tokens=False)'s ids; for a fast tokenizer straight from its Rust
    backend, skipping the conversion of every encoding into Python objects that are not used."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def _encode(
    pairs: list[tuple[list[int], list[int]]], *, cutoff_len: int, train_on_prompt: bool, mask_history: bool
) -> tuple[EncodedExample, bool]:
    """The encoded example of a conversation's token pairs and whether truncation dropped any token."""
    if mask_history:
        # The last turn goes first so that truncation never drops the only labelled turn.
        pairs = pairs[::-1]
    input_ids: list[int] = []
    labels: list[int] = []
    total_len = 0
    truncated = False
    for turn_index, (source_ids, target_ids) in enumerate(pairs):
        if total_len >= cutoff_len:
            truncated = True
            break
        source_len, target_len = infer_seqlen(len(source_ids), len(target_ids), cutoff_len - total_len)
        truncated |= (source_len, target_len) != (len(source_ids), len(target_ids))
        source_ids, target_ids = source_ids[:source_len], target_ids[:target_len]
        total_len += source_len + target_len
        source_labels = list(source_ids) if train_on_prompt else [IGNORE_INDEX] * source_len
        target_labels = [IGNORE_INDEX] * target_len if mask_history and turn_index > 0 else list(target_ids)
        if mask_history:
            input_ids = source_ids + target_ids + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source_ids + target_ids
            labels += source_labels + target_labels
    return EncodedExample(input_ids=input_ids, labels=labels), truncated


def encode_example(
    example: Example,
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> EncodedExample:
    """Tokenize `example` with `template`, truncate to `cutoff_len` and label the assistant tokens."""
    (pairs,) = encode_pairs_batch([example.messages], template, tokenizer)
    encoded, _ = _encode(
        pairs,
        cutoff_len=cutoff_len,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
    )
    return encoded


def encode_examples(
    examples: list[Example],
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    num_workers: int | None = None,
) -> EncodeResult:
    """Encode every example; one left without a trained-on token after truncation is a bad record.

    With `num_workers` > 1 (`preprocessing_num_workers`), contiguous chunks are encoded in that many
    spawned processes and joined in order, so the result is the same as encoding in this process.
    """
    encode = partial(
        _encode_chunk,
        template=template,
        tokenizer=tokenizer,
        cutoff_len=cutoff_len,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
    )
    if not num_workers or num_workers <= 1 or len(examples) < 2 * num_workers:
        return encode(examples)
    chunk_size = math.ceil(len(examples) / num_workers)
    chunks = [examples[start : start + chunk_size] for start in range(0, len(examples), chunk_size)]
    # spawn, not fork: the caller may be a Ray worker or hold torch threads, which fork does not copy safely.
    with ProcessPoolExecutor(
        max_workers=len(chunks), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        results = list(pool.map(encode, chunks))
    return EncodeResult(
        encoded=[e for r in results for e in r.encoded],
        examples=[e for r in results for e in r.examples],
        num_truncated=sum(r.num_truncated for r in results),
        problems=[p for r in results for p in r.problems],
    )


def _encode_chunk(
    examples: list[Example],
    *,
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
) -> EncodeResult:
    encoded: list[EncodedExample] = []
    kept: list[Example] = []
    problems: list[BadRecord] = []
    num_truncated = 0
    conversations = encode_pairs_batch([example.messages for example in examples], template, tokenizer)
    for example, pairs in zip(examples, conversations, strict=True):
        result, truncated = _encode(
            pairs,
            cutoff_len=cutoff_len,
            train_on_prompt=train_on_prompt,
            mask_history=mask_history,
        )
        num_truncated += truncated
        if all(label == IGNORE_INDEX for label in result.labels):
            problems.append(
                BadRecord(
                    example.source_file,
                    example.line,
                    f"no response token left after truncation to cutoff_len={cutoff_len} "
                    f"(the prompt is too long); raise cutoff_len or shorten the prompt",
                )
            )
            continue
        encoded.append(result)
        kept.append(example)
    return EncodeResult(encoded=encoded, examples=kept, num_truncated=num_truncated, problems=problems)
