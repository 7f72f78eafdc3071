"""Who may use the jobs REST API: reads take the API key (or the admin key), writes (submit, cancel,
resume: a job runs its spec's code on the cluster) only the admin key, and `serve_api` / `clusterft
jobs api` refuse a non-loopback bind without a key before anything starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from clusterft.cli.jobs import add_jobs_commands
from clusterft.controller.api import create_app, serve_api
from clusterft.controller.jobs import Jobs
from clusterft.errors import UserError

SPEC = {"model_name_or_path": "models/tiny-llama", "dataset": "demo_tasks", "output_dir": "saves/x"}
KEY, ADMIN_KEY = "sk-read-0123456789", "sk-admin-9876543210"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def jobs(tmp_path: Path):
    jobs = Jobs(tmp_path / "root", tmp_path / "registry")
    yield jobs
    jobs.close()


def submit(client: TestClient, tmp_path: Path, headers: dict[str, str]):
    return client.post("/v1/jobs", json={"spec": SPEC, "base_dir": str(tmp_path)}, headers=headers)


def test_writes_need_the_admin_key_and_reads_the_api_key(jobs: Jobs, tmp_path: Path) -> None:
    client = TestClient(create_app(jobs, api_key=KEY, admin_api_key=ADMIN_KEY))
    for headers in ({}, bearer(KEY), bearer("nope")):
        refused = submit(client, tmp_path, headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
    created = submit(client, tmp_path, bearer(ADMIN_KEY))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    for route in ("cancel", "resume"):
        assert client.post(f"/v1/jobs/{job_id}/{route}", headers=bearer(KEY)).status_code == 401
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(ADMIN_KEY)).json()["status"] == "cancelled"
    for key in (KEY, ADMIN_KEY):  # reads: either key
        assert client.get(f"/v1/jobs/{job_id}", headers=bearer(key)).json()["status"] == "cancelled"
    assert client.get("/v1/jobs", headers=bearer("nope")).status_code == 401
    assert jobs.get(job_id).status.value == "cancelled"


def test_an_api_key_without_an_admin_key_turns_writes_off(jobs: Jobs, tmp_path: Path) -> None:
    """The API key is for clients that follow jobs; holding it must not let them run code."""
    client = TestClient(create_app(jobs, api_key=KEY))
    refused = submit(client, tmp_path, bearer(KEY))
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("PermissionDeniedError", "admin_disabled")
    assert "--admin-api-key" in error["message"] and "CLUSTERFT_ADMIN_API_KEY" in error["message"]
    assert client.get("/v1/jobs", headers=bearer(KEY)).json()["data"] == []


def test_an_admin_key_alone_guards_writes_and_leaves_reads_open(jobs: Jobs, tmp_path: Path) -> None:
    client = TestClient(create_app(jobs, admin_api_key=ADMIN_KEY))
    assert submit(client, tmp_path, {}).status_code == 401
    assert submit(client, tmp_path, bearer(ADMIN_KEY)).status_code == 201
    assert len(client.get("/v1/jobs").json()["data"]) == 1


def test_the_key_is_checked_before_the_body_is_read(jobs: Jobs, tmp_path: Path) -> None:
    """A caller without the key a route needs learns nothing about its body's schema: the 401 (or the
    403 of a server without an admin key) comes before any 400 of a malformed body."""
    malformed = ({"content": b"{not json"}, {"json": {"spec": 5, "base_dir": []}}, {"content": b"x" * 5000})
    client = TestClient(create_app(jobs, api_key=KEY, admin_api_key=ADMIN_KEY))
    for body in malformed:
        for headers in ({}, bearer("nope"), bearer(KEY)):  # the API key is no admin key: 401 on a write
            headers = {**headers, "content-type": "application/json"}
            refused = client.post("/v1/jobs", headers=headers, **body)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/v1/jobs", headers=bearer(ADMIN_KEY), **body).status_code == 400
    too_large = client.post("/v1/jobs", headers=bearer(ADMIN_KEY), content=b" " * (1 << 20 | 1))
    assert too_large.status_code == 413, too_large.text  # never parsed
    writes_off = TestClient(create_app(jobs, api_key=KEY))
    for body in malformed:
        headers = {**bearer(KEY), "content-type": "application/json"}
        refused = writes_off.post("/v1/jobs", headers=headers, **body)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "admin_disabled"
    assert client.get("/v1/jobs", params={"limit": "x"}).status_code == 401  # reads: the key before the query
    assert client.get("/v1/jobs", params={"limit": "x"}, headers=bearer(KEY)).status_code == 400
    assert client.get("/openapi.json").status_code == 200  # the schema stays open


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "jobs.example.com"])
def test_serve_api_refuses_an_exposed_host_without_a_key(jobs: Jobs, host: str) -> None:
    # start_controller=True: the refusal comes before it would look for a Ray cluster.
    with pytest.raises(UserError, match=rf"--host {host} exposes the jobs API .*--api-key KEY.*--insecure"):
        serve_api(jobs.root, jobs.registry_root, host=host, port=1, start_controller=True)


def test_cli_jobs_api_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLUSTERFT_API_KEY", raising=False)
    monkeypatch.setenv("CLUSTERFT_ADMIN_API_KEY", "adm-env")
    parser = argparse.ArgumentParser(prog="clusterft")
    add_jobs_commands(parser.add_subparsers(dest="command", required=True))
    common = ["jobs", "--root", str(tmp_path / "root"), "--registry", str(tmp_path / "registry"), "api"]
    args = parser.parse_args(common)
    assert (args.host, args.api_key, args.admin_api_key, args.insecure) == (
        "127.0.0.1",
        None,
        "adm-env",
        False,
    )
    args = parser.parse_args([*common, "--host", "0.0.0.0"])
    with pytest.raises(UserError, match="no API key is set"):
        args.handler(args)
    args = parser.parse_args([*common, "--api-key", "k", "--admin-api-key", "a", "--insecure"])
    assert (args.api_key, args.admin_api_key, args.insecure) == ("k", "a", True)
