"""The dashboard's routes on the jobs API, without a browser or a cluster: its data under the API's
keys, the editor's validation with lines, promote and rollback on a real registry, the serving
figures read from the serve app's real Prometheus text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from clusterft.controller.api import create_app
from clusterft.controller.jobs import Jobs
from clusterft.dashboard.routes import RequestRate
from clusterft.dashboard.views import serving_summary
from clusterft.registry.registry import Registry
from tests.dashboard.conftest import ENGINE_STATS

KEY, ADMIN = "sk-read-0123456789", "sk-admin-0123456789"
SPEC = {
    "model_name_or_path": "models/tiny-llama",
    "dataset": "demo_tasks",
    "output_dir": "out",
    "max_steps": 3,
}


@pytest.fixture
def jobs(tmp_path: Path):
    jobs = Jobs(tmp_path / "root", tmp_path / "registry")
    yield jobs
    jobs.close()


def client(jobs: Jobs, key: str | None) -> TestClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(create_app(jobs, api_key=KEY, admin_api_key=ADMIN), headers=headers)


def test_the_page_is_open_and_its_data_needs_the_key(jobs: Jobs) -> None:
    anonymous = client(jobs, None)
    page = anonymous.get("/dashboard")
    assert page.status_code == 200 and "dashboard.js" in page.text
    assert anonymous.get("/dashboard/assets/uplot-1.6.32.iife.min.js").status_code == 200
    for path in ("/dashboard/assets/..%2Froutes.py", "/dashboard/assets/nope.js"):
        assert anonymous.get(path).status_code == 404
    assert anonymous.get("/v1/dashboard/registry").status_code == 401
    assert client(jobs, KEY).get("/v1/dashboard/registry").status_code == 200


def test_metrics_after_a_step_and_logs_tail(jobs: Jobs, tmp_path: Path) -> None:
    reader = client(jobs, KEY)
    job = client(jobs, ADMIN).post("/v1/jobs", json={"spec": SPEC, "base_dir": str(tmp_path)}).json()
    out = tmp_path / "out"
    out.mkdir()
    lines = [
        {"step": s, "loss": 2.0 / s, "lr": 0.1, "grad_norm": None, "tokens_per_s": 9.0} for s in (1, 2, 3)
    ]
    lines[2]["loss"] = float("nan")  # a diverged step is a gap, not an invalid JSON response
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = reader.get(f"/v1/dashboard/jobs/{job['id']}/metrics", params={"after": 1}).json()["data"]
    assert [(r["step"], r["loss"]) for r in data] == [(2, 1.0), (3, None)]
    assert reader.get(f"/v1/dashboard/jobs/{job['id']}/checkpoints").json()["data"] == []
    assert reader.get(f"/v1/dashboard/jobs/{job['id']}/logs").text == ""
    assert reader.get("/v1/dashboard/jobs/job-nope/metrics").status_code == 404


def test_validate_names_each_problem_at_its_line(jobs: Jobs) -> None:
    admin = client(jobs, ADMIN)
    text = "model_name_or_path: m\ndataset: demo_tasks\nlerning_rate: 0.1\noutput_dir: o\nmax_steps: -3\n"
    problems = admin.post("/v1/dashboard/validate", json={"spec_yaml": text}).json()["problems"]
    assert [(p["line"], p["key"]) for p in problems] == [(3, "lerning_rate")]
    assert "did you mean 'learning_rate'" in problems[0]["message"]
    broken = admin.post("/v1/dashboard/validate", json={"spec_yaml": "dataset: d\nbad: x: y\n"}).json()
    assert broken["ok"] is False and broken["problems"][0]["line"] == 2
    values = "model_name_or_path: m\ndataset: d\nlearning_rate: -1\noutput_dir: o\nparallel:\n  strategy: z\n"
    problems = admin.post("/v1/dashboard/validate", json={"spec_yaml": values}).json()["problems"]
    assert [(p["line"], p["key"]) for p in problems] == [(3, "learning_rate"), (6, "parallel.strategy")]
    assert admin.post("/v1/dashboard/validate", json={"spec_yaml": text.replace("ler", "lear")}).json()["ok"]
    assert client(jobs, KEY).post("/v1/dashboard/validate", json={"spec_yaml": text}).status_code == 401


def two_versions(jobs: Jobs, tmp_path: Path) -> Registry:
    """The jobs' registry with two full versions of `tiny`, v0001 and v0002."""
    model = tmp_path / "model"
    model.mkdir()
    registry = Registry(jobs.registry_root)
    for n in (1, 2):
        (model / "weights.bin").write_bytes(bytes([n]) * 16)
        registry.register("tiny", model, kind="full")
    return registry


def test_promote_and_rollback_need_the_admin_key(jobs: Jobs, tmp_path: Path) -> None:
    two_versions(jobs, tmp_path)
    reader, admin = client(jobs, KEY), client(jobs, ADMIN)
    body = {"version": "v1", "alias": "production"}
    assert reader.post("/v1/dashboard/registry/tiny/promote", json=body).status_code == 401
    assert admin.post("/v1/dashboard/registry/tiny/promote", json=body).json()["changed"] is True
    assert admin.post("/v1/dashboard/registry/tiny/promote", json=body).json()["changed"] is False
    admin.post("/v1/dashboard/registry/tiny/promote", json={"version": "v2", "alias": "production"})
    back = admin.post("/v1/dashboard/registry/tiny/rollback", json={"alias": "production"}).json()
    assert back["change"]["version"] == "v0001" and back["change"]["previous"] == "v0002"
    view = reader.get("/v1/dashboard/registry").json()
    (tiny,) = view["models"]
    assert tiny["aliases"] == {"production": "v0001", "canary": None}
    assert [v["version"] for v in tiny["versions"]] == ["v0002", "v0001"]
    assert [(h["action"], h["version"]) for h in tiny["history"]] == [
        ("promote", "v0001"),
        ("promote", "v0002"),
        ("rollback", "v0001"),
    ]
    assert (view["actions"], view["canary_weights"]) == (["promote", "rollback", "canary"], True)
    refused = admin.post("/v1/dashboard/registry/tiny/rollback", json={"alias": "canary"})
    assert refused.status_code == 400 and "no earlier version" in refused.json()["error"]["message"]


def test_the_canary_weight_needs_the_admin_key_and_a_whole_percentage(jobs: Jobs, tmp_path: Path) -> None:
    registry = two_versions(jobs, tmp_path)
    registry.promote("tiny", "v1")
    reader, admin = client(jobs, KEY), client(jobs, ADMIN)
    url = "/v1/dashboard/registry/tiny/canary"
    assert reader.post(url, json={"weight": 10, "version": "v2"}).status_code == 401
    no_canary = admin.post(url, json={"weight": 10})
    assert no_canary.status_code == 400 and "set one first" in no_canary.json()["error"]["message"]
    assert admin.post(url, json={"weight": 10, "version": "v2"}).json()["changed"] is True
    for bad in (101, -5):
        refused = admin.post(url, json={"weight": bad})
        assert refused.status_code == 400 and "0 to 100" in refused.json()["error"]["message"]
    assert admin.post(url, json={"weight": 2.5}).status_code == 400
    changed = admin.post(url, json={"weight": 30}).json()
    assert changed["change"]["previous_weight"] == 10 and changed["change"]["reason"] == "dashboard"
    (tiny,) = reader.get("/v1/dashboard/registry").json()["models"]
    assert (tiny["aliases"]["canary"], tiny["canary_weight"]) == ("v0002", 30)
    back = admin.post("/v1/dashboard/registry/tiny/rollback", json={"alias": "canary"}).json()
    assert back["change"]["weight"] == 10 and registry.traffic("tiny").weights == {"v0001": 90, "v0002": 10}


def test_serving_figures_from_the_apps_prometheus_text() -> None:
    from clusterft.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    for seconds in (0.1, 0.3):
        metrics.ttft.observe(seconds)
    metrics.observe_tokens(0.2, 4)
    metrics.requests.labels("200").inc(3)
    metrics.requests.labels("400").inc()
    stats = {**ENGINE_STATS, "model_weight_version": 3}
    text = metrics.render(
        {"r1": stats, "r2": {**stats, "kv_usage": 0.25, "model_weight_version": 2}}
    ).decode()
    summary = serving_summary(text)
    assert summary["engine_replicas"] == 2
    assert summary["kv_usage"] == pytest.approx(0.375)
    assert summary["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert summary["ttft_mean_s"] == pytest.approx(0.2)
    assert summary["itl_mean_s"] == pytest.approx(0.05)
    assert summary["requests_total"] == 4
    assert [(r["replica"], r["version"], r["kv_usage"]) for r in summary["replicas"]] == [
        ("r1", 3, 0.5),
        ("r2", 2, 0.25),
    ]


def test_request_rate_between_scrapes() -> None:
    rate = RequestRate()
    assert rate.update(10, now=100.0) is None
    assert rate.update(30, now=104.0) == 5.0
    assert rate.update(2, now=105.0) is None  # the app restarted: its counter began again


def test_evaluation_against_the_specs_gates(jobs: Jobs, tmp_path: Path) -> None:
    import dataclasses

    from clusterft.config import parse_job_dict
    from clusterft.dashboard.views import evaluation

    raw = {
        **SPEC,
        "output_dir": str(tmp_path / "out"),
        "eval": {"metrics": ["loss", "exact_match"]},
        "promote": {"gates": ["exact_match >= 0.5", "loss <= 1.0"]},
    }
    job = jobs.submit(parse_job_dict(raw, "t"), base_dir=tmp_path)
    assert evaluation(job)["gates"][0] == {
        "gate": "exact_match >= 0.5",
        "metric": "exact_match",
        "value": None,
        "passes": None,
    }
    evaluated = dataclasses.replace(
        job, result={"eval": {"exact_match": 0.75, "loss": 1.5}, "model_name": "out", "version": "v0001"}
    )
    view = evaluation(evaluated)
    assert [(g["gate"], g["value"], g["passes"]) for g in view["gates"]] == [
        ("exact_match >= 0.5", 0.75, True),
        ("loss <= 1", 1.5, False),
    ]
    assert view["registered"] == {"model_name": "out", "version": "v0001"}
