"""`streaming: true`: examples read from JSON Lines files one line at a time, never all at once.

A JSON list has to be parsed whole, so streaming refuses it (with the one-line conversion). Bad
records are collected as they are met and reported together at the end, as without streaming.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clusterft.data.converter import convert_alpaca, convert_sharegpt
from clusterft.data.errors import BadRecord, DatasetError
from clusterft.data.example import Example
from clusterft.data.registry import get_dataset_attr


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any] | BadRecord]:
    """(line, record) of each non-blank line of the JSON Lines file `path`, or a BadRecord for a line
    that is not JSON."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found; check file_name in dataset_info.json")
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if line_no == 1 and line.lstrip().startswith("["):
                raise DatasetError(
                    f"{path}: streaming: true reads JSON Lines (one record per line), and this file is a "
                    f"JSON list; convert it (jq -c '.[]' {path.name} > {path.stem}.jsonl) or set "
                    "streaming: false"
                )
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadRecord(str(path), line_no, f"invalid JSON: {exc.msg}")


def stream_examples(
    names: list[str], dataset_dir: Path, problems: list[BadRecord], *, max_samples: int | None = None
) -> Iterator[Example]:
    """Examples of the datasets `names` in order (at most `max_samples` records each), read lazily;
    each bad record is appended to `problems` instead of stopping the stream."""
    for name in names:
        attr = get_dataset_attr(name, dataset_dir)
        path = dataset_dir / attr.file_name
        convert = convert_alpaca if attr.formatting == "alpaca" else convert_sharegpt
        taken = 0  # like max_samples without streaming: counts records, not lines that are not JSON
        for item in iter_json_lines(path):
            if isinstance(item, BadRecord):
                problems.append(item)
                continue
            if max_samples is not None and taken == max_samples:
                break
            taken += 1
            line, record = item
            result = convert(record, attr, str(path), line)
            if isinstance(result, str):
                problems.append(BadRecord(str(path), line, result))
            else:
                yield result


def streamed_eval_count(val_size: float) -> int:
    """How many of the first streamed examples `val_size` holds out: a stream's length is unknown
    until it ends, so (as in LLaMA-Factory) only a count is possible, not a fraction."""
    if val_size == 0:
        return 0
    if val_size < 1 or val_size != int(val_size):
        raise DatasetError(
            f"val_size={val_size}: with streaming: true the held-out split is the first val_size examples, "
            "so val_size must be a whole number of examples (≥ 1), or use eval_dataset"
        )
    return int(val_size)
