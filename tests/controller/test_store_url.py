"""A PostgreSQL job store through every door that opens a store: `Jobs` (the CLI and the REST API),
`clusterft jobs --store-url` and `$CLUSTERFT_STORE_URL`, the controller and the drivers it launches,
and the check that a running controller actor serves the same store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clusterft.cli import main as cli
from clusterft.controller.actor import check_same_controller
from clusterft.controller.controller import Controller
from clusterft.controller.jobs import Jobs
from clusterft.controller.runs import RunFiles, launch
from clusterft.controller.store import JobStore
from clusterft.controller.store_backend import STORE_URL_ENV, describe
from clusterft.errors import UserError
from tests.controller.conftest import make_spec, new_postgres_store


@pytest.fixture
def store_url(postgres_server) -> str:
    """A new store's URL with a password in it (the test server trusts its socket and ignores it),
    to see where it shows."""
    url = new_postgres_store(postgres_server)
    assert "postgres:@" in url
    return url.replace("postgres:@", "postgres:s3cret@", 1)


def test_jobs_and_the_cli_keep_jobs_in_the_store_the_url_names_not_in_the_root(
    store_url: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    root, registry = tmp_path / "controller", tmp_path / "registry"
    jobs = Jobs(root, registry, store_url=store_url)
    job = jobs.submit(make_spec(), base_dir=tmp_path)
    jobs.close()
    assert not (root / "jobs.db").exists()
    with JobStore(store_url) as store:
        assert [j.id for j in store.list()] == [job.id]

    base = ["jobs", "--root", str(root), "--registry", str(registry)]
    capsys.readouterr()
    assert cli([*base, "--store-url", store_url, "list", "--json"]) == 0
    assert [record["id"] for record in json.loads(capsys.readouterr().out)] == [job.id]
    monkeypatch.setenv(STORE_URL_ENV, store_url)
    assert cli([*base, "status", job.id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "submitted"
    monkeypatch.delenv(STORE_URL_ENV)
    assert cli([*base, "list", "--json"]) == 0  # unset: SQLite in the root, where no job is
    assert json.loads(capsys.readouterr().out) == []


def test_a_driver_reads_its_job_from_the_controllers_url_never_shown_on_its_command_line(
    store_url: str, tmp_path: Path
) -> None:
    controller = Controller(tmp_path / "controller", tmp_path / "registry", env={}, store_url=store_url)
    try:
        assert controller.store.where == describe(store_url) and "s3cret" not in controller.store.where
        controller.tick()  # nothing to do, on PostgreSQL
        job = controller.store.submit(make_spec(eval={"enabled": False}))
        files = RunFiles.of(controller.root, job.id, 1, "eval")
        process = launch(files, job.id, controller.store.location, {"PATH": "/usr/bin:/bin"})
        command = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert process.wait(timeout=120) == 0, files.log.read_text()
    finally:
        controller.close()
    assert b"--store" not in command and not any(b"s3cret" in part for part in command)
    assert files.read_result() == {"ok": True, "metrics": {}}
    assert "s3cret" not in files.log.read_text()


def test_the_eval_driver_still_takes_a_sqlite_store_on_its_command_line(tmp_path: Path) -> None:
    path = tmp_path / "controller" / "jobs.db"
    with JobStore(path) as store:
        job = store.submit(make_spec(eval={"enabled": False}))
    files = RunFiles.of(tmp_path / "controller", job.id, 1, "eval")
    process = launch(files, job.id, path, {"PATH": "/usr/bin:/bin"})
    assert process.wait(timeout=120) == 0, files.log.read_text()
    assert f"--store {path}" in files.log.read_text()
    assert files.read_result() == {"ok": True, "metrics": {}}


def test_a_running_controller_of_another_store_is_refused_with_how_to_reach_it() -> None:
    root, registry = Path("/shared/controller"), Path("/shared/registry")
    sqlite = describe(root / "jobs.db")
    postgres = describe("postgresql://ctl:s3cret@db/jobs")
    info = {"root": str(root), "registry": str(registry), "store": sqlite}
    check_same_controller(info, root, registry, sqlite)
    with pytest.raises(UserError) as refused:
        check_same_controller(info, root, registry, postgres)
    message = str(refused.value)
    assert message.startswith(
        "this Ray cluster's controller keeps jobs in /shared/controller/jobs.db (root /shared/controller, "
        "registry /shared/registry), not postgresql://ctl:***@db/jobs"
    )
    assert "use its --root, --registry and --store-url, or stop it" in message
    with pytest.raises(UserError):  # a controller of an older clusterft names no store: not this one
        check_same_controller({"root": str(root), "registry": str(registry)}, root, registry, sqlite)


def test_the_driver_entry_point_needs_a_store() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clusterft.cli.run_job", "eval", "--job", "job-x", "--out", "/tmp/x"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and f"give --store DB or set ${STORE_URL_ENV}" in done.stderr
