"""Checks of a job spec against the world it will run in: files, directories, dataset names.

The spec itself is validated without touching the filesystem (it may be written on a laptop and
run on a cluster); these checks run where the job is about to start, so that a missing dataset is
reported before training, not at step 500.
"""

from __future__ import annotations

import json
from pathlib import Path

from clusterft.config.loader import suggest
from clusterft.config.spec import JobSpec
from clusterft.errors import UserError


def check_job_paths(spec: JobSpec, base_dir: str | Path | None = None) -> list[str]:
    """Raise UserError for what cannot work here; return warnings for what may exist elsewhere."""
    from clusterft.data.registry import load_dataset_info

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    warnings: list[str] = []
    model = spec.model.model_name_or_path
    if not (base / model / "config.json").is_file():
        warnings.append(
            f"model_name_or_path {model!r}: no HF model dir (config.json) at {base / model}; make one with "
            f"`clusterft make-tiny-model {model}` or point it at a model on shared storage"
        )
    info = load_dataset_info(base / spec.data.dataset_dir)
    for name in [*spec.data.dataset, *(spec.data.eval_dataset or []), *(spec.eval.dataset or [])]:
        if name not in info:
            raise UserError(
                f"dataset {name!r} is not registered in {base / spec.data.dataset_dir / 'dataset_info.json'}"
                f"{suggest(name, sorted(info))} (registered: {', '.join(sorted(info))})"
            )
    if spec.parallel.deepspeed:
        path = base / spec.parallel.deepspeed
        try:
            json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(
                f"deepspeed: {path} not found; give the path of a DeepSpeed JSON config"
            ) from None
        except json.JSONDecodeError as err:
            raise UserError(f"deepspeed: {path} is not valid JSON ({err}); fix the file") from None
    return warnings
