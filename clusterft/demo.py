"""`clusterft demo` (what `make demo` runs): the main job end to end on an embedded default.

Each step prints what it does and how long it took, and the run ends with a summary table. The
steps grow with the project: today the demo makes the tiny model, validates the quickstart job and
previews its training data.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clusterft.runtime import PROJECT_ROOT

QUICKSTART_JOB = PROJECT_ROOT / "jobs" / "quickstart.yaml"


@dataclass
class DemoRun:
    """The summary table rows, filled in as the steps run."""

    rows: list[tuple[str, str, float]] = field(default_factory=list)

    def step(self, title: str, action: Callable[[], str]) -> None:
        print(f"\n==> {title}", flush=True)
        start = time.perf_counter()
        result = action()
        elapsed = time.perf_counter() - start
        self.rows.append((title, result, elapsed))
        print(f"    {result} ({elapsed:.1f}s)", flush=True)

    def summary(self) -> str:
        width = max(len(title) for title, _, _ in self.rows)
        lines = [f"{'step'.ljust(width)}  {'seconds':>7}  result", "-" * (width + 40)]
        lines += [f"{t.ljust(width)}  {s:7.1f}  {r}" for t, r, s in self.rows]
        return "\n".join(lines)


def write_demo_job(work: Path) -> Path:
    """The quickstart job with every path made absolute under `work` (datasets stay bundled)."""
    import yaml

    raw = yaml.safe_load(QUICKSTART_JOB.read_text())
    raw["model_name_or_path"] = str(work / raw["model_name_or_path"])
    raw["dataset_dir"] = str(PROJECT_ROOT / raw["dataset_dir"])
    raw["output_dir"] = str(work / raw["output_dir"])
    raw["checkpoint"]["storage_path"] = str(work / raw["checkpoint"]["storage_path"])
    work.mkdir(parents=True, exist_ok=True)
    job_path = work / "demo-job.yaml"
    job_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return job_path


def run_demo(workdir: str | Path = ".", quick: bool = False) -> int:
    """Run the demo in `workdir` (models/ and saves/ are written there); return the exit code."""
    from clusterft.config import load_job_spec
    from clusterft.data.preview import preview
    from clusterft.hf.tiny import count_parameters, make_tiny_model
    from clusterft.preflight import check_job_paths

    work = Path(workdir).resolve()
    job_path = write_demo_job(work)
    spec = load_job_spec(job_path)
    model_dir = Path(spec.model.model_name_or_path)
    run = DemoRun()

    def make_model() -> str:
        if not (model_dir / "config.json").is_file():
            make_tiny_model(model_dir, arch="llama", size="tiny")
        return f"{model_dir} ({count_parameters(model_dir):,} parameters)"

    def validate() -> str:
        for warning in check_job_paths(spec):
            print(f"    warning: {warning}")
        return f"{job_path} valid (spec hash {spec.spec_hash()[:12]})"

    def preview_data() -> str:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        text = preview(
            spec.data, tokenizer, 2 if quick else 3, seed=spec.train.seed, color=sys.stdout.isatty()
        )
        print(text)
        return "trained-on tokens are marked [[...]]"

    run.step("make the tiny model", make_model)
    run.step("validate the quickstart job", validate)
    run.step("preview its training data", preview_data)
    print("\n" + run.summary())
    return 0
