"""Load registered datasets into `Example`s, collecting every bad record before failing."""

from __future__ import annotations

from pathlib import Path

from clusterft.data.converter import convert_alpaca, convert_sharegpt
from clusterft.data.errors import BadRecord, raise_bad_records
from clusterft.data.example import Example
from clusterft.data.reader import read_records
from clusterft.data.registry import get_dataset_attr


def collect_examples(
    names: list[str], dataset_dir: str | Path, *, max_samples: int | None = None
) -> tuple[list[Example], list[BadRecord]]:
    """Examples of the datasets `names` (in order, at most `max_samples` each) and the bad records.

    Like LLaMA-Factory, `max_samples` takes the first records of each file; only those are checked.
    """
    examples: list[Example] = []
    problems: list[BadRecord] = []
    for name in names:
        attr = get_dataset_attr(name, dataset_dir)
        path = Path(dataset_dir) / attr.file_name
        records, unreadable = read_records(path)
        problems += unreadable
        if max_samples is not None:
            records = records[:max_samples]
        convert = convert_alpaca if attr.formatting == "alpaca" else convert_sharegpt
        for line, record in records:
            result = convert(record, attr, str(path), line)
            if isinstance(result, str):
                problems.append(BadRecord(str(path), line, result))
            else:
                examples.append(result)
    return examples, problems


def load_examples(
    names: list[str], dataset_dir: str | Path, *, max_samples: int | None = None
) -> list[Example]:
    """Examples of the registered datasets `names`; raises one DatasetError listing all bad records."""
    examples, problems = collect_examples(names, dataset_dir, max_samples=max_samples)
    raise_bad_records(problems)
    return examples
