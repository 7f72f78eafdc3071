"""The `dataset_info.json` registry, in LLaMA-Factory's format.

    {"demo_tasks": {"file_name": "demo_tasks.json"},
     "chats": {"file_name": "chats.jsonl", "formatting": "sharegpt",
               "columns": {"messages": "conversations", "system": "system"},
               "tags": {"role_tag": "from", "content_tag": "value",
                        "user_tag": "human", "assistant_tag": "gpt"}}}

Only local files are supported (no `hf_hub_url`: no hub is reachable from the machines we run on).
`formatting: openai` is LLaMA-Factory's shorthand for sharegpt with OpenAI's role/content tags.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from clusterft.data.errors import DatasetError

DATASET_INFO = "dataset_info.json"

Formatting = Literal["alpaca", "sharegpt"]

_ALPACA_COLUMNS = ("prompt", "query", "response", "system", "history")
_SHAREGPT_COLUMNS = ("messages", "system")
# Valid in LLaMA-Factory, but clusterft trains text-only SFT: refused rather than silently ignored.
_UNSUPPORTED = ("tools", "images", "videos", "audios", "chosen", "rejected", "kto_tag", "function_tag")
_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag")
_OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
}


@dataclass(frozen=True)
class DatasetAttr:
    """One registered dataset: its file, format and column/tag mapping (LLaMA-Factory's defaults)."""

    name: str
    file_name: str
    formatting: Formatting = "alpaca"
    # alpaca columns
    prompt: str = "instruction"
    query: str | None = "input"
    response: str = "output"
    history: str | None = None
    # column of both formats
    system: str | None = None
    # sharegpt column and tags
    messages: str = "conversations"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"
    observation_tag: str = "observation"


def _parse_attr(name: str, entry: Any, info_path: Path) -> DatasetAttr:
    """Build the DatasetAttr of one dataset_info.json entry; errors name the entry and the key."""
    where = f"{info_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object with file_name, got {type(entry).__name__}")
    if "file_name" not in entry:
        remote = [key for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if key in entry]
        hint = f" ({remote[0]} is not supported: no hub is reachable; download the file)" if remote else ""
        raise DatasetError(f"{where}: missing file_name{hint}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DatasetError(f"{where}: formatting {formatting!r} is not alpaca, sharegpt or openai")
    attr = DatasetAttr(name=name, file_name=str(entry["file_name"]))
    if formatting == "openai":
        attr = replace(attr, formatting="sharegpt", messages="messages", **_OPENAI_TAGS)
    else:
        attr = replace(attr, formatting=formatting)

    allowed_columns = _ALPACA_COLUMNS if attr.formatting == "alpaca" else _SHAREGPT_COLUMNS
    attr = replace(attr, **_checked_mapping(entry.get("columns", {}), allowed_columns, f"{where}: columns"))
    if "tags" in entry:
        if attr.formatting != "sharegpt":
            raise DatasetError(f"{where}: tags apply to sharegpt datasets only; add formatting: sharegpt")
        attr = replace(attr, **_checked_mapping(entry["tags"], _TAGS, f"{where}: tags"))
    return attr


def _checked_mapping(mapping: Any, allowed: tuple[str, ...], where: str) -> dict[str, str]:
    if not isinstance(mapping, dict):
        raise DatasetError(f"{where}: expected an object, got {type(mapping).__name__}")
    for key, value in mapping.items():
        if key not in allowed:
            kind = "is not supported by clusterft" if key in _UNSUPPORTED else "is unknown"
            raise DatasetError(f"{where}: {key!r} {kind}; allowed: {', '.join(allowed)}")
        if not isinstance(value, str):
            raise DatasetError(f"{where}: {key} must be a string, got {value!r}")
    return dict(mapping)


def load_dataset_info(dataset_dir: str | Path) -> dict[str, DatasetAttr]:
    """Read `dataset_dir/dataset_info.json` into {name: DatasetAttr}."""
    info_path = Path(dataset_dir) / DATASET_INFO
    if not info_path.is_file():
        raise DatasetError(f"{info_path} not found; set dataset_dir to the directory holding {DATASET_INFO}")
    try:
        raw = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{info_path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{info_path}: expected an object mapping dataset names to entries")
    return {name: _parse_attr(name, entry, info_path) for name, entry in raw.items()}


def get_dataset_attr(name: str, dataset_dir: str | Path) -> DatasetAttr:
    """Look up one dataset by name; an unknown name is an error that suggests the closest one."""
    registry = load_dataset_info(dataset_dir)
    if name in registry:
        return registry[name]
    info_path = Path(dataset_dir) / DATASET_INFO
    close = difflib.get_close_matches(name, list(registry), n=1)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    raise DatasetError(
        f"unknown dataset {name!r}: not registered in {info_path} "
        f"(registered: {', '.join(sorted(registry)) or 'none'}){suggestion}"
    )
