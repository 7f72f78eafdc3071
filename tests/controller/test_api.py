"""The jobs REST API and the jobs CLI group over a job store, without a cluster: the controller
is not running, so submitted jobs stay `submitted` until one does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from clusterft.cli.jobs import add_eval_command, add_jobs_commands
from clusterft.controller.api import create_app
from clusterft.controller.jobs import Jobs, absolute_spec
from tests.controller.conftest import make_spec

SPEC = {
    "model_name_or_path": "models/tiny-llama",
    "dataset": "demo_tasks",
    "output_dir": "saves/x",
    "max_steps": 4,
}
KEY = "sk-test-0123456789"


@pytest.fixture
def jobs(tmp_path: Path):
    jobs = Jobs(tmp_path / "root", tmp_path / "registry")
    yield jobs
    jobs.close()


@pytest.fixture
def client(jobs: Jobs) -> TestClient:
    # One key as both: writes need the admin key (tests/controller/test_api_auth.py tells them apart).
    app = create_app(jobs, api_key=KEY, admin_api_key=KEY)
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


def test_missing_or_wrong_key_is_401_in_openai_error_schema(jobs: Jobs) -> None:
    bare = TestClient(create_app(jobs, api_key=KEY))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        response = bare.get("/v1/jobs", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("AuthenticationError", "invalid_api_key")
        assert KEY not in json.dumps(response.json())


def test_no_key_configured_means_no_auth(jobs: Jobs) -> None:
    assert TestClient(create_app(jobs)).get("/v1/jobs").status_code == 200


def test_submit_status_cancel_resume_over_http(client: TestClient, tmp_path: Path) -> None:
    created = client.post("/v1/jobs", json={"spec": SPEC, "name": "demo", "base_dir": str(tmp_path)})
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["status"], job["name"], job["attempt"]) == ("submitted", "demo", 0)
    listed = client.get("/v1/jobs").json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    status = client.get(f"/v1/jobs/{job['id']}").json()
    assert [e["to_state"] for e in status["events"]] == ["submitted"]
    assert status["progress"] == {"step": 0, "planned_steps": 4, "loss": None}
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/resume").json()["status"] == "resuming"
    conflict = client.post(f"/v1/jobs/{job['id']}/resume")
    assert conflict.status_code == 400 and "only cancelled or error" in conflict.json()["error"]["message"]
    assert client.get(f"/v1/jobs/{job['id']}/logs").text == ""


def test_bad_requests_are_400_and_unknown_jobs_404(client: TestClient) -> None:
    assert client.get("/v1/jobs/job-nope").status_code == 404
    bad_gate = {**SPEC, "promote": {"gates": ["exact_mach >= 0.8"]}}
    response = client.post("/v1/jobs", json={"spec": bad_gate})
    assert response.status_code == 400 and "exact_match" in response.json()["error"]["message"]
    assert client.post("/v1/jobs", json={}).status_code == 400
    assert client.post("/v1/jobs", json={"spec_yaml": "- a list"}).status_code == 400


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"parallel": {"strategy": "pipeline"}},
            "parallel.strategy pipeline trains finetuning_type full only",
        ),
        ({"resume": {"from_checkpoint": "s3://ckpt/step_000000004"}}, "resume.from_checkpoint: s3://ckpt/"),
    ],
)
def test_a_job_the_spec_refuses_is_never_stored(client: TestClient, change: dict, expected: str) -> None:
    """Refused at submit, with the field and the fix, rather than by a driver the controller starts."""
    response = client.post("/v1/jobs", json={"spec": {**SPEC, **change}})
    assert response.status_code == 400 and expected in response.json()["error"]["message"]
    assert client.get("/v1/jobs").json()["data"] == []


def test_openapi_schema_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/logs"} <= set(paths)
    assert {"/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/resume"} <= set(paths)


def test_submitted_spec_has_absolute_paths(tmp_path: Path) -> None:
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    spec = absolute_spec(make_spec(), tmp_path)
    assert spec.model.model_name_or_path == str(tmp_path / "models" / "tiny-llama")
    assert spec.train.output_dir == str(tmp_path / "saves" / "demo")
    assert spec.data.dataset_dir == str(tmp_path / "data")
    # A name that is not a local path (a hub id) is left as written.
    other = absolute_spec(make_spec(), tmp_path / "elsewhere")
    assert other.model.model_name_or_path == "models/tiny-llama"


def test_cli_group_parses(tmp_path: Path, capsys: pytest.CaptureFixture[str], jobs: Jobs) -> None:
    parser = argparse.ArgumentParser(prog="clusterft")
    commands = parser.add_subparsers(dest="command", required=True)
    add_jobs_commands(commands)
    add_eval_command(commands)
    job = jobs.submit(make_spec(), base_dir=tmp_path)
    common = ["jobs", "--root", str(jobs.root), "--registry", str(jobs.registry_root)]
    for argv in (["list"], ["status", job.id, "--json"], ["logs", job.id], ["cancel", job.id]):
        args = parser.parse_args([*common, *argv])
        assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert job.id in out and "cancelled" in out
    args = parser.parse_args(["eval", "m", "--dataset", "a,b", "--benchmark", "--max-samples", "3"])
    assert (args.dataset, args.benchmark, args.max_samples) == (["a", "b"], True, 3)


def test_a_retried_submit_with_its_idempotency_key_gives_back_the_first_job(
    client: TestClient, tmp_path: Path
) -> None:
    body = {"spec": SPEC, "base_dir": str(tmp_path)}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-me"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-me"})
    assert first.status_code == again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/jobs").json()["data"]) == 1
    # Without the key, a second job in the same folders is refused while the first is unsettled.
    second = client.post("/v1/jobs", json=body)
    assert second.status_code == 409
    message = second.json()["error"]["message"]
    assert f"train.output_dir {tmp_path / 'saves' / 'x'} belongs to job {first.json()['id']}" in message
    reused = client.post("/v1/jobs", json={**body, "name": "other"}, headers={"Idempotency-Key": "retry-me"})
    assert reused.status_code == 409 and "another spec" in reused.json()["error"]["message"]


def test_a_name_the_registry_refuses_is_refused_at_submit(client: TestClient, tmp_path: Path) -> None:
    response = client.post("/v1/jobs", json={"spec": SPEC, "name": "my model", "base_dir": str(tmp_path)})
    assert response.status_code == 400
    assert "invalid model name 'my model'" in response.json()["error"]["message"]
    assert client.get("/v1/jobs").json()["data"] == []


def test_a_torn_metrics_line_is_skipped_and_the_jobs_list_still_answers(
    client: TestClient, tmp_path: Path
) -> None:
    output = tmp_path / "saves" / "x"
    output.mkdir(parents=True)
    # A driver killed mid-append leaves half a line; the next attempt appends after it.
    (output / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.5}\n{"step": 2, "lo{"step": 2, "loss": 2.25}\n{"step": 3, "loss": 2.0}\n{"st'
    )
    created = client.post("/v1/jobs", json={"spec": SPEC, "base_dir": str(tmp_path)})
    assert created.status_code == 201
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl: skipped line\(s\) 2, 4, not a metrics record"):
        listed = client.get("/v1/jobs")
    assert listed.status_code == 200
    assert listed.json()["data"][0]["progress"] == {"step": 3, "planned_steps": 4, "loss": 2.0}
