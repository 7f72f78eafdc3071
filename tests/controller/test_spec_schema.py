"""The stored-spec schema version must move when a JobSpec field goes away (see stored_spec.py).

`spec_schemas/N.txt` pins every dotted JobSpec field of spec schema N. Removing or renaming a field
without bumping SPEC_SCHEMA_VERSION would let an old clusterft's stored jobs fail to load as if they
were corrupt; this test fails instead, and says what to do."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from clusterft.config.spec import JobSpec
from clusterft.controller.stored_spec import SPEC_SCHEMA_VERSION

PINNED = Path(__file__).parent / "spec_schemas"


def field_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from field_paths(info.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def pinned(schema: int) -> set[str]:
    return set((PINNED / f"{schema}.txt").read_text(encoding="utf-8").split())


def test_every_field_of_the_current_spec_schema_still_exists() -> None:
    missing = [n for n in range(1, SPEC_SCHEMA_VERSION + 1) if not (PINNED / f"{n}.txt").is_file()]
    assert not missing, f"keep every spec schema's field list: {PINNED}/<N>.txt missing for {missing}"
    removed = pinned(SPEC_SCHEMA_VERSION) - set(field_paths(JobSpec))
    assert not removed, (
        f"JobSpec lost {sorted(removed)} without a new spec schema: bump SPEC_SCHEMA_VERSION in "
        f"clusterft/controller/stored_spec.py and pin the new field list in {PINNED}/<N>.txt"
    )
