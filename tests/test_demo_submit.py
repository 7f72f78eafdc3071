"""The demo's submission: a demo job left unsettled by an interrupted earlier demo in the same work dir
is cancelled (and said so), not a reason to fail; another job's folders stay refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterft.config import parse_job_dict
from clusterft.controller.jobs import Jobs
from clusterft.controller.store import FolderInUse
from clusterft.demo import submit_demo_job


def spec(out: str):
    return parse_job_dict(
        {"model_name_or_path": "models/tiny", "dataset": "demo_tasks", "output_dir": out, "max_steps": 4},
        "demo.yaml",
    )


def test_an_interrupted_demos_job_is_cancelled_and_replaced(tmp_path: Path) -> None:
    jobs = Jobs(tmp_path / "controller", tmp_path / "registry")
    first, note = submit_demo_job(jobs, spec("saves/quickstart"), tmp_path)
    assert note == ""
    second, note = submit_demo_job(jobs, spec("saves/quickstart"), tmp_path)
    assert f"cancelled {first.id}" in note and second.id != first.id
    assert jobs.get(first.id).status.value == "cancelled"
    assert jobs.get(second.id).status.value == "submitted"


def test_another_jobs_folder_is_not_taken(tmp_path: Path) -> None:
    jobs = Jobs(tmp_path / "controller", tmp_path / "registry")
    other = jobs.submit(spec("saves/quickstart"), base_dir=tmp_path, name="someone-else")
    with pytest.raises(FolderInUse, match=other.id):
        submit_demo_job(jobs, spec("saves/quickstart"), tmp_path)
    assert jobs.get(other.id).status.value == "submitted"
