"""The job spec as the store keeps it: a YAML dump of the resolved JobSpec plus its schema version.

A job outlives the clusterft that submitted it: an unsettled job is picked up by the next version's
controller. JobSpec forbids unknown keys, so a field removed (or renamed) since the dump would make
the job unreadable. Each job therefore stores `SPEC_SCHEMA_VERSION` as it was when written, and a
spec of an older schema is read tolerantly: keys this JobSpec no longer has are dropped, and the
controller records them in the job's history once (`JobStore.upgrade_spec`). A key whose absence
changed meaning is set to the old meaning on the way, and recorded the same way. A spec of the
current schema with an unknown key is still an error (it is a bug, not history), and one of a newer
schema is refused with the fix.

    0   jobs stored before the store kept a spec schema (job-store schema 1)
    1   the first versioned spec
    2   promote.auto: a job without gates no longer promotes unless it says so; one stored before
        (which that clusterft promoted) loads with promote.auto: true
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from clusterft.config.spec import JobSpec
from clusterft.controller.state import Job
from clusterft.errors import UserError

SPEC_SCHEMA_VERSION = 2
"""Bump it whenever a JobSpec field is removed or renamed, or a missing key comes to mean something
else (adding a field whose default keeps the old behaviour needs no bump); a spec stored under an
older number then loads without the keys that went away, and with the old meaning spelled out."""


class SpecSchemaError(UserError):
    """A stored spec this clusterft cannot read."""


@dataclass(frozen=True)
class LoadedSpec:
    spec: JobSpec
    dropped: Mapping[str, Any] = field(default_factory=dict)
    """Dotted key → value of each stored key this JobSpec no longer has."""
    kept_meaning: Mapping[str, Any] = field(default_factory=dict)
    """Dotted key → value set so the spec means what it meant when stored (see the module docstring)."""


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec as the store keeps it (nested sections, field names)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def load_spec(spec_yaml: str, schema: int) -> LoadedSpec:
    """Read a stored spec written under spec schema `schema` (see the module docstring)."""
    if schema > SPEC_SCHEMA_VERSION:
        raise SpecSchemaError(
            f"the job's spec was stored by a newer clusterft (spec schema {schema}; this one reads up to "
            f"{SPEC_SCHEMA_VERSION}); upgrade clusterft to run or inspect it"
        )
    try:
        raw = yaml.safe_load(spec_yaml)
    except yaml.YAMLError as err:
        raise SpecSchemaError(
            f"the job's stored spec is not valid YAML ({err}); submit its YAML again"
        ) from None
    if not isinstance(raw, dict):
        raise SpecSchemaError(
            f"the job's stored spec is a {type(raw).__name__}, not a mapping of keys; submit its YAML again"
        )
    dropped: dict[str, Any] = {}
    kept_meaning: dict[str, Any] = {}
    if schema < SPEC_SCHEMA_VERSION:
        raw = _known_keys(raw, JobSpec, "", dropped)
    if schema < 2:
        promote = raw.setdefault("promote", {})
        if isinstance(promote, dict) and "auto" not in promote and not promote.get("gates"):
            promote["auto"] = kept_meaning["promote.auto"] = True
    try:
        return LoadedSpec(JobSpec.model_validate(raw), dropped, kept_meaning)
    except ValidationError as err:
        raise SpecSchemaError(
            f"the job's stored spec (spec schema {schema}) does not validate against this clusterft's "
            f"JobSpec: {err}; cancel the job and submit its YAML again"
        ) from None


def job_spec(job: Job) -> JobSpec:
    """The job's resolved spec (nested sections, absolute paths), read tolerantly if it is old."""
    return load_spec(job.spec_yaml, job.spec_schema).spec


def _known_keys(
    raw: dict[str, Any], model: type[BaseModel], prefix: str, dropped: dict[str, Any]
) -> dict[str, Any]:
    """`raw` without the keys `model` has no field for, recursively into sections; each dropped key
    goes into `dropped` under its dotted path."""
    kept = {}
    for key, value in raw.items():
        info = model.model_fields.get(key)
        if info is None:
            dropped[prefix + key] = value
            continue
        section = _section_type(info.annotation)
        if section is not None and isinstance(value, dict):
            value = _known_keys(value, section, f"{prefix}{key}.", dropped)
        kept[key] = value
    return kept


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (`Section` or `Section | None`), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
