"""The controller on a real local Ray cluster, with real driver processes killed for real.

One cluster, one controller root and one Serve app following the registry's `production` alias
serve the module; each job is a tiny 8-step LoRA run: end to end to `serving`, a SIGKILLed training
driver resumed bit for bit, a controller actor killed mid-job that comes back and finishes it, and a
job held back by its gate that `clusterft registry promote` then puts into service and
`registry rollback` takes out again.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

from clusterft.cli import main as cli
from clusterft.controller.actor import CONTROLLER_NAME, NAMESPACE, get_or_start_controller
from clusterft.controller.jobs import Jobs
from clusterft.controller.runs import RunFiles, kill, pid_runs_job
from clusterft.controller.state import JobState
from clusterft.registry.registry import Registry
from clusterft.registry.serving import read_records
from clusterft.serve.spec import RegistrySource, ServeSpec
from clusterft.train.export import read_metrics
from tests.serve.conftest import ENGINE, free_port
from tests.train.helpers import bundles, final_weights, make_job

pytestmark = pytest.mark.slow
DONE = {JobState.REGISTERED, JobState.PROMOTED, JobState.SERVING, JobState.ERROR, JobState.CANCELLED}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("controller")


@pytest.fixture(scope="module")
def jobs(root):
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="cftctl", dir="/tmp"),
        log_to_driver=False,
        namespace=NAMESPACE,
    )
    actor = get_or_start_controller(root, root / "registry", poll_s=0.2)
    jobs = Jobs(root, root / "registry", controller=actor)
    yield jobs
    ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE), no_restart=True)
    # A driver that outlived the test (it runs in its own session) must not outlive the module.
    for pid_file in (root / "runs").glob("*/attempt-*/*.pid"):
        pid = int(pid_file.read_text())
        if pid_runs_job(pid, pid_file.parts[-3]):
            kill(pid, grace_s=2)
    jobs.close()
    ray.shutdown()


def job_spec(tiny_llama: Path, out: Path, **overrides):
    sections = {
        "eval": {"dataset": ["demo_tasks_eval"], "max_samples": 8, "max_new_tokens": 8},
        "promote": {"model_name": "tiny", "auto": True},
        "failure": {"max_failures": 0, "max_job_restarts": 2, "backoff_s": 0.2},
    }
    for key, value in overrides.items():
        sections[key] = {**sections.get(key, {}), **value}
    return make_job(tiny_llama, out, **sections)


def wait_until(jobs: Jobs, job_id: str, states: set[JobState], timeout_s: float = 240.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = jobs.get(job_id)
        if job.status in states:
            return job
        time.sleep(0.2)
    logs = "".join(p.read_text()[-3000:] for p in jobs.log_paths(job_id) if p.is_file())
    raise AssertionError(f"{job_id} still {jobs.get(job_id).status} after {timeout_s}s\n{logs}")


@pytest.fixture(scope="module")
def reference(jobs, tiny_llama, tmp_path_factory):
    """An uninterrupted job, end to end: trained, evaluated, registered and promoted."""
    spec = job_spec(tiny_llama, tmp_path_factory.mktemp("reference") / "out")
    job = jobs.submit(spec)
    return spec, wait_until(jobs, job.id, DONE)


@pytest.fixture(scope="module")
def app(jobs, reference, root):
    """The Serve app following `production` of `tiny` (0 CPUs reserved: training needs both)."""
    from ray import serve

    from clusterft.serve.app import build_app

    spec = ServeSpec(
        registry=RegistrySource(root=str(root / "registry"), model_name="tiny", poll_interval_s=0.25),
        port=free_port(),
        engine=ENGINE,
        engine_num_cpus=0,
        worker_num_cpus=0,
        ingress_num_cpus=0,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": spec.port})
    try:
        serve.run(build_app(spec), name="clusterft", route_prefix="/")
        yield f"http://127.0.0.1:{spec.port}"
    finally:
        serve.shutdown()


def served_version(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["version"]


def test_job_runs_end_to_end_to_serving(reference, app, jobs, root):
    spec, job = reference
    assert job.status is JobState.PROMOTED, job.reason
    assert (job.attempt, job.restarts) == (1, 0)
    assert job.result["train"]["completed_steps"] == job.result["train"]["planned_steps"] == 8
    registry = Registry(root / "registry")
    version = registry.show("tiny", job.result["version"])
    assert registry.aliases("tiny")["production"] == version.version
    assert version.manifest.kind == "adapter" and version.manifest.job_id == job.id
    assert version.manifest.eval["num_examples"] == 8
    assert {"loss", "perplexity", "exact_match"} <= set(version.manifest.eval)
    assert "adapter_model.safetensors" in version.manifest.files
    assert "metrics.jsonl" not in version.manifest.files
    assert (Path(spec.train.output_dir) / "eval.json").is_file()
    # The app follows production; its replica's serving record moves the job to `serving`.
    job = wait_until(jobs, job.id, {JobState.SERVING}, 120)
    assert [e.to_state for e in jobs.store.events(job.id)][-3:] == [
        JobState.REGISTERED,
        JobState.PROMOTED,
        JobState.SERVING,
    ]
    [record] = read_records(root / "registry", "tiny")
    assert (record.version, record.alias, record.app) == (version.version, "production", "clusterft")
    assert served_version(app) == version.version


def test_sigkilled_driver_resumes_from_checkpoint_bitwise(jobs, reference, tiny_llama, tmp_path):
    spec = job_spec(tiny_llama, tmp_path / "out")
    job = jobs.submit(spec)
    pid_file = RunFiles.of(jobs.root, job.id, 1, "train").pid_file
    deadline = time.time() + 180
    while not (pid_file.exists() and any(b.step >= 4 for b in bundles(spec).list(verify=False))):
        assert time.time() < deadline, "no checkpoint of step 4"
        time.sleep(0.02)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    killed_at = time.time()
    relaunched = wait_until(jobs, job.id, {JobState.TRAINING, *DONE} - {JobState.REGISTERED}, 60)
    while jobs.get(job.id).attempt < 2:
        time.sleep(0.05)
    relaunched_at = time.time()
    metrics = Path(spec.train.output_dir) / "metrics.jsonl"
    seen = metrics.stat().st_size
    while metrics.stat().st_size == seen and time.time() < deadline:
        time.sleep(0.05)
    stepping_at = time.time()
    job = wait_until(jobs, job.id, DONE)
    print(
        f"\nresume latency after driver SIGKILL: relaunched {relaunched_at - killed_at:.1f}s, "
        f"first new step {stepping_at - killed_at:.1f}s"
    )
    assert relaunched is not None
    assert job.status in (JobState.PROMOTED, JobState.SERVING, JobState.REGISTERED), job.reason
    assert (job.attempt, job.restarts) == (2, 1)
    history = [(e.to_state, e.reason) for e in jobs.store.events(job.id)]
    assert [s for s, _ in history][:5] == [
        JobState.SUBMITTED,
        JobState.TRAINING,
        JobState.FAILED,
        JobState.RESUMING,
        JobState.TRAINING,
    ]
    assert "SIGKILL" in history[2][1]
    assert job.resumed_from is not None and int(job.resumed_from.rsplit("_", 1)[1]) >= 4
    assert job.result["train"]["completed_steps"] == 8
    expected, got = final_weights(reference[0]), final_weights(spec)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_killed_controller_restarts_and_finishes_the_job(jobs, reference, app, tiny_llama, tmp_path):
    import ray

    spec = job_spec(tiny_llama, tmp_path / "out", promote={"gates": ["exact_match >= 0.99"]})
    job = jobs.submit(spec)
    actor = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    before = ray.get(actor.info.remote())["pid"]
    metrics = Path(spec.train.output_dir) / "metrics.jsonl"
    deadline = time.time() + 180
    while len(read_metrics(metrics)) < 2:
        assert time.time() < deadline, "training never reached step 2"
        time.sleep(0.05)
    ray.kill(actor, no_restart=False)
    # The kill is asynchronous: a call sent right after it may still reach the old process.
    deadline = time.time() + 60
    while ray.get(actor.info.remote(), timeout=60)["pid"] == before:
        assert time.time() < deadline, "the controller actor was not restarted after ray.kill"
        time.sleep(0.2)
    job = wait_until(jobs, job.id, DONE)
    # Held back by its gate: registered with the reason, production untouched.
    assert job.status is JobState.REGISTERED, job.reason
    assert "exact_match >= 0.99" in job.reason
    assert Registry(jobs.registry_root).aliases("tiny")["production"] != job.result["version"]
    assert job.result["train"]["completed_steps"] == 8
    expected, got = final_weights(reference[0]), final_weights(spec)
    assert all(torch.equal(expected[name], got[name]) for name in expected)

    # The held version, promoted by hand, goes into service; the job serving before steps back.
    registry = ["registry", "--registry", str(jobs.registry_root)]
    [before] = [j for j in jobs.store.list([JobState.SERVING]) if j.name == "tiny"]
    previous = before.result["version"]
    promoted_at = time.time()
    assert cli([*registry, "promote", "tiny", job.result["version"]]) == 0
    job = wait_until(jobs, job.id, {JobState.SERVING}, 120)
    serving_s = time.time() - promoted_at
    assert served_version(app) == job.result["version"]
    before = wait_until(jobs, before.id, {JobState.REGISTERED}, 30)
    assert before.reason.startswith(f"production promoted to {job.result['version']} (")
    rolled_back_at = time.time()
    assert cli([*registry, "rollback", "tiny"]) == 0
    before = wait_until(jobs, before.id, {JobState.SERVING}, 120)
    rollback_serving_s = time.time() - rolled_back_at
    job = wait_until(jobs, job.id, {JobState.REGISTERED}, 30)
    assert job.reason.startswith(f"production rolled back to {previous} (")
    assert served_version(app) == previous
    promoted = [e for e in jobs.store.events(job.id) if e.to_state is JobState.PROMOTED]
    assert [e.reason.split(" (")[0] for e in promoted] == [f"production promoted to {job.result['version']}"]
    print(f"\nregistry promote -> serving {serving_s:.1f}s; rollback -> serving {rollback_serving_s:.1f}s")
