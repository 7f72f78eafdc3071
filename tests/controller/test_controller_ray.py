"""The controller on a real local Ray cluster, with real driver processes killed for real.

One cluster and one controller root serve the module; each job is a tiny 8-step LoRA run:
end to end to `promoted`, a SIGKILLed training driver resumed bit for bit, a controller actor
killed mid-job that comes back and finishes it, and a job held back by its gate.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch

from clusterft.controller.controller import CONTROLLER_NAME, NAMESPACE, get_or_start_controller
from clusterft.controller.jobs import Jobs
from clusterft.controller.registry import Registry
from clusterft.controller.runs import RunFiles, kill, pid_runs_job
from clusterft.controller.state import JobState
from clusterft.train.export import read_metrics
from tests.train.helpers import bundles, final_weights, make_job

pytestmark = pytest.mark.slow
DONE = {JobState.REGISTERED, JobState.PROMOTED, JobState.ERROR, JobState.CANCELLED}


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
        "promote": {"model_name": "tiny"},
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


def test_job_runs_end_to_end_to_promoted(reference, root):
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
    assert job.status in (JobState.PROMOTED, JobState.REGISTERED), job.reason
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


def test_killed_controller_restarts_and_finishes_the_job(jobs, reference, tiny_llama, tmp_path):
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
