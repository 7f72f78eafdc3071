"""YAML → JobSpec, with errors that name the file, the line, the key and the fix."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from clusterft.config.spec import FLAT_GROUPS, SECTIONS, JobSpec
from clusterft.errors import UserError

# LLaMA-Factory keys that clusterft accepts so its YAMLs load unchanged, but that do nothing here;
# each is reported with the reason when a spec uses it.
IGNORED_KEYS: dict[str, str] = {
    "overwrite_cache": "the tokenized cache is keyed by the data options, files and tokenizer",
    "ddp_timeout": "Ray Train sets the process-group timeout",
    "save_only_model": "checkpoints always hold the optimizer state so that resume is exact",
    "eval_strategy": "evaluation runs after training, as set in the eval section",
    "eval_steps": "evaluation runs after training, as set in the eval section",
    "flash_attn": "the attention kernel follows the hardware",
    "ddp_find_unused_parameters": "DeepSpeed decides",
    "logging_steps": "every optimizer step is logged to output_dir/metrics.jsonl",
    "dataloader_num_workers": "batches are collated in the training process from pre-tokenized examples",
}
# Flat LLaMA-Factory keys that land in a clusterft section.
RENAMED_KEYS: dict[str, tuple[str, str]] = {
    "deepspeed": ("parallel", "deepspeed"),
    "resume_from_checkpoint": ("resume", "from_checkpoint"),
}

FLAT_OWNER: dict[str, str] = {
    field: group for group, model in FLAT_GROUPS.items() for field in model.model_fields
}
TOP_LEVEL_KEYS = sorted({*FLAT_OWNER, *SECTIONS, *RENAMED_KEYS, *IGNORED_KEYS, "callbacks"})


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    line: int | None = None


class SpecError(UserError):
    """One or more problems in a job spec file; `problems` lists each with its key and line."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = [
            f"{source}:{p.line}: {p.key}: {p.message}" if p.line else f"{source}: {p.key}: {p.message}"
            for p in problems
        ]
        super().__init__("invalid job spec\n  " + "\n  ".join(lines))


def suggest(key: str, candidates: list[str]) -> str:
    """' did you mean X?' for the closest candidate, or '' if none is close."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # `stages` → `pipeline_stages`: a fragment of the real name
        close = [c for c in candidates if len(key) >= 4 and key.lower() in c.lower()][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Map dotted key paths (`parallel.strategy`) to 1-based line numbers in the YAML text."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path + "."))
    return lines


def parse_job_dict(raw: dict[str, Any], source: str, lines: dict[str, int] | None = None) -> JobSpec:
    """Group LLaMA-Factory flat keys and clusterft sections, then validate into a JobSpec."""
    lines = lines or {}
    problems: list[Problem] = []
    nested: dict[str, dict[str, Any]] = {group: {} for group in FLAT_GROUPS}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in FLAT_OWNER:
            nested[FLAT_OWNER[key]][key] = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(
                    Problem(key, f"must be a mapping of settings, got {type(value).__name__}", lines.get(key))
                )
                continue
            for sub in value:
                if sub not in SECTIONS[key].model_fields:
                    hint = suggest(str(sub), list(SECTIONS[key].model_fields))
                    problems.append(Problem(f"{key}.{sub}", f"unknown key{hint}", lines.get(f"{key}.{sub}")))
            extra.setdefault(key, {}).update(value)
        elif key in RENAMED_KEYS:
            section, field = RENAMED_KEYS[key]
            if value is not None:
                extra.setdefault(section, {})[field] = value
        elif key == "callbacks":
            extra["callbacks"] = value or []
        elif key in IGNORED_KEYS:
            warnings.warn(f"{source}: {key} is accepted but ignored: {IGNORED_KEYS[key]}", stacklevel=2)
        else:
            problems.append(Problem(key, f"unknown key{suggest(key, TOP_LEVEL_KEYS)}", lines.get(key)))
    for required in ("model_name_or_path", "dataset", "output_dir"):
        if required not in raw:
            problems.append(Problem(required, "is required", None))
    if problems:
        raise SpecError(source, problems)
    try:
        return JobSpec.model_validate({**nested, **extra})
    except ValidationError as err:
        raise SpecError(source, [_problem(e, lines) for e in err.errors()]) from None


def _problem(error: Any, lines: dict[str, int]) -> Problem:
    loc = [str(part) for part in error["loc"]]
    if loc and loc[0] in FLAT_GROUPS:
        loc = loc[1:]  # flat keys are written without their group
    key = ".".join(loc) or "(spec)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "is required"
    return Problem(key, message, lines.get(key) or (lines.get(loc[0]) if loc else None))


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec YAML file. Raises SpecError naming every problem."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            source, [Problem("(file)", "not found; give the path of a job YAML, e.g. jobs/quickstart.yaml")]
        ) from None
    return parse_job_yaml(text, source)


def parse_job_yaml(text: str, source: str) -> JobSpec:
    """Validate a job spec's YAML text; every problem of the SpecError carries its line when the
    key is in the text (the dashboard's editor marks them there)."""
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise SpecError(
            source, [Problem("(yaml)", f"not valid YAML: {getattr(err, 'problem', err)}", line)]
        ) from None
    if not isinstance(raw, dict):
        raise SpecError(source, [Problem("(spec)", "must be a YAML mapping of keys to values")])
    return parse_job_dict(raw, source, _key_lines(node) if node is not None else {})
