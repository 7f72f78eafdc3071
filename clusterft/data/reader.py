"""Read the records of a JSON (one list) or JSONL (one object per line) file, each with its line number.

Line numbers are what make a bad-record report actionable. For a JSON list we scan it record by
record with `json.JSONDecoder.raw_decode`, so each record knows the line where it starts, at the
speed of the C scanner (no second pass, no line-tracking parser).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clusterft.data.errors import BadRecord, DatasetError

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\r\n"


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_json_list(text: str, start: int, path: str) -> list[tuple[int, Any]]:
    """Records of the JSON list whose "[" is at `start`; line numbers are counted incrementally."""
    records: list[tuple[int, Any]] = []
    pos = _skip_whitespace(text, start + 1)
    line, counted_to = 1, 0
    if pos < len(text) and text[pos] == "]":
        return records
    while True:
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            record, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        records.append((line, record))
        pos = _skip_whitespace(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_whitespace(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            if _skip_whitespace(text, pos + 1) != len(text):
                raise DatasetError(f"{path}:{_line_at(text, pos)}: unexpected data after the closing ]")
            return records
        else:
            raise DatasetError(f"{path}:{_line_at(text, pos)}: invalid JSON: expected ',' or ']'")


def _read_json_lines(text: str, path: str) -> tuple[list[tuple[int, Any]], list[BadRecord]]:
    records: list[tuple[int, Any]] = []
    problems: list[BadRecord] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json.loads(line)))
        except json.JSONDecodeError as exc:
            # One broken line of a JSONL file does not hide the others: report them together.
            problems.append(BadRecord(path, line_no, f"invalid JSON: {exc.msg}"))
    return records, problems


def read_records(path: str | Path) -> tuple[list[tuple[int, Any]], list[BadRecord]]:
    """Return [(line, record)] and the lines that are not valid JSON.

    The format is decided by content, not extension (as HF `datasets` does): a file whose first
    non-blank character is `[` is a JSON list, anything else is JSON Lines.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset file not found; check file_name in dataset_info.json") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    start = _skip_whitespace(text, 0)
    if start == len(text):
        raise DatasetError(f"{path}: the dataset file is empty")
    if text[start] == "[":
        return _read_json_list(text, start, str(path)), []
    return _read_json_lines(text, str(path))
