"""Generate the bundled demo datasets: `clusterft data write-demo examples/data`.

demo_tasks / demo_tasks_eval: reverse or sort a short digit string (alpaca). A randomly initialised
~0.9M-parameter Llama learns both from scratch in a few CPU minutes (digits are single tokens), so
the demo shows exact match rising from ~0 to high; the eval split shares no (task, digits) with train.
demo_sharegpt (JSONL): two-turn conversations over the same tasks, for sharegpt format coverage.
identity: a handful of who-are-you answers with a system prompt, as in LLaMA-Factory's identity set.

Deterministic: the same seed writes byte-identical files (they are committed).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SEED = 20240601
NUM_TRAIN = 4000
NUM_EVAL = 200
NUM_SHAREGPT = 64
MIN_DIGITS, MAX_DIGITS = 3, 5

TASKS = {
    "reverse": lambda digits: digits[::-1],
    "sort": lambda digits: "".join(sorted(digits)),
}

DATASET_INFO = {
    "demo_tasks": {"file_name": "demo_tasks.json"},
    "demo_tasks_eval": {"file_name": "demo_tasks_eval.json"},
    "demo_sharegpt": {
        "file_name": "demo_sharegpt.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    },
    "identity": {"file_name": "identity.json", "columns": {"system": "system"}},
}

IDENTITY_QUESTIONS = [
    "Who are you?",
    "What is your name?",
    "Introduce yourself.",
    "What are you?",
    "Who made you?",
    "Are you a person?",
    "What can you do?",
    "Tell me about yourself.",
]
IDENTITY_ANSWER = "I am clusterft-demo, a tiny model fine-tuned with clusterft. I reverse and sort digits."


def _task_pairs(rng: random.Random, count: int, exclude: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """`count` distinct (task, digits) pairs not in `exclude` (digits may repeat within a string)."""
    pairs: list[tuple[str, str]] = []
    seen = set(exclude)
    while len(pairs) < count:
        task = rng.choice(sorted(TASKS))
        length = rng.randint(MIN_DIGITS, MAX_DIGITS)
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        if (task, digits) not in seen:
            seen.add((task, digits))
            pairs.append((task, digits))
    return pairs


def _alpaca(task: str, digits: str) -> dict[str, str]:
    return {"instruction": task, "input": digits, "output": TASKS[task](digits)}


def build_demo_datasets(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """{file name: records} of every demo dataset."""
    rng = random.Random(seed)
    eval_pairs = _task_pairs(rng, NUM_EVAL, set())
    train_pairs = _task_pairs(rng, NUM_TRAIN, set(eval_pairs))
    sharegpt = []
    for _ in range(NUM_SHAREGPT):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))
        reversed_digits = TASKS["reverse"](digits)
        sharegpt.append(
            {
                "conversations": [
                    {"from": "human", "value": f"reverse\n{digits}"},
                    {"from": "gpt", "value": reversed_digits},
                    {"from": "human", "value": "sort"},
                    {"from": "gpt", "value": TASKS["sort"](reversed_digits)},
                ]
            }
        )
    identity = [
        {"system": "You are clusterft-demo.", "instruction": question, "input": "", "output": IDENTITY_ANSWER}
        for question in IDENTITY_QUESTIONS
    ]
    return {
        "demo_tasks.json": [_alpaca(*pair) for pair in train_pairs],
        "demo_tasks_eval.json": [_alpaca(*pair) for pair in eval_pairs],
        "demo_sharegpt.jsonl": sharegpt,
        "identity.json": identity,
    }


def _dump(file_name: str, records: list[dict[str, Any]]) -> str:
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    if file_name.endswith(".jsonl"):
        return "\n".join(lines) + "\n"
    # One record per line: diffs stay readable and error line numbers point at one record.
    return "[\n" + ",\n".join(lines) + "\n]\n"


def write_demo_datasets(out_dir: str | Path, seed: int = SEED) -> Path:
    """Write the demo datasets and their dataset_info.json to `out_dir`; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file_name, records in build_demo_datasets(seed).items():
        (out / file_name).write_text(_dump(file_name, records), encoding="utf-8")
    (out / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2) + "\n", encoding="utf-8")
    return out
