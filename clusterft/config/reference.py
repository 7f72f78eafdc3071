"""The job spec reference, generated from the pydantic models so that the README cannot drift.

`python -m clusterft.config.reference [--write README.md]` prints (or rewrites in place) the
Markdown that README.md holds between the `spec-reference` markers; a test checks it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import PydanticUndefined

from clusterft.config.loader import IGNORED_KEYS, RENAMED_KEYS
from clusterft.config.spec import FLAT_GROUPS, SECTIONS

BEGIN, END = "<!-- spec-reference:begin -->", "<!-- spec-reference:end -->"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("Literal", "one of ").replace("NoneType", "None")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{json.dumps(field.default)}`"


def _table(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind = _type_name(field.annotation).replace("|", r"\|")
        meaning = (field.description or "").replace("|", r"\|")
        rows.append(f"| `{prefix}{name}` | {kind} | {_default(field)} | {meaning} |")
    return rows


def render_reference() -> str:
    """Markdown tables of every job spec key, grouped as in the YAML."""
    out = ["### LLaMA-Factory keys (flat, at the top level)", ""]
    for group, model in FLAT_GROUPS.items():
        out += [f"**{group}**", "", *_table(model), ""]
    out += ["Also accepted: " + ", ".join(f"`{k}` (→ `{s}.{f}`)" for k, (s, f) in RENAMED_KEYS.items()) + "."]
    out += ["Accepted and ignored, with a warning: " + ", ".join(f"`{k}`" for k in IGNORED_KEYS) + ".", ""]
    out += ["### clusterft sections", ""]
    for section, model in SECTIONS.items():
        out += [f"**`{section}:`**", "", *_table(model, f"{section}."), ""]
    out += ["**`callbacks:`** a list of dotted paths to callback classes.", ""]
    return "\n".join(out)


def update_readme(path: str | Path) -> None:
    """Rewrite the generated block of `path` (between the markers) in place."""
    readme = Path(path)
    text = readme.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + render_reference().strip() + "\n" + text[stop:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        update_readme(sys.argv[2] if len(sys.argv) > 2 else "README.md")
    else:
        print(render_reference())
