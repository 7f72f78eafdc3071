"""`ray job submit` end to end: a `ray start --head` cluster runs a training job submitted to it.

The cluster lives in a private temp dir. Teardown stops exactly the processes of that cluster (found
by its temp dir in their command lines) rather than `ray stop`, which would also stop any other Ray
cluster on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.train.helpers import EXAMPLES

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
FIXED_PORTS = (
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "ray-client-server",
    "runtime-env-agent",
    "metrics-export",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_pids(temp_dir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def stop_cluster(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while cluster_pids(temp_dir) and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head_cluster():
    temp_dir = tempfile.mkdtemp(prefix="cfthead", dir="/tmp")
    dashboard_port = free_port()
    command = [
        *(RAY, "start", "--head", "--num-cpus=2", f"--temp-dir={temp_dir}", f"--port={free_port()}"),
        *("--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats"),
        # Every listening port of its own: with the defaults (e.g. the job agent's 52365) a second Ray
        # cluster on the machine leaves this one without a job agent ("No available agent").
        *(f"--{name}-port={free_port()}" for name in FIXED_PORTS),
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_when_ready(command: list[str], wait_s: float = 90) -> subprocess.CompletedProcess[str]:
    """Run `ray job submit`, again while the new head's job agent is still starting: right after
    `ray start` the dashboard answers before its agent does, and refuses jobs it has not started."""
    deadline = time.time() + wait_s
    while True:
        result = subprocess.run(command, capture_output=True, text=True, timeout=400)
        if "No available agent to submit job" not in result.stdout + result.stderr or time.time() > deadline:
            return result
        time.sleep(2)


def test_ray_job_submit_trains(head_cluster, tiny_llama, tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    out = tmp_path / "out"
    job = {
        "model_name_or_path": str(tiny_llama),
        "finetuning_type": "lora",
        "dataset": "demo_tasks",
        "dataset_dir": str(EXAMPLES),
        "template": "chatml",
        "cutoff_len": 48,
        "max_samples": 32,
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "save_steps": 2,
        "learning_rate": 1e-2,
        "output_dir": str(out),
        "cluster": {"num_workers": 2},
    }
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    clusterft = str(Path(sys.executable).parent / "clusterft")  # the console script, as a user runs it
    submit = [RAY, "job", "submit", "--address", head_cluster, "--working-dir", str(workdir), "--"]
    result = submit_when_ready([*submit, clusterft, "train", "job.yaml", "--no-progress"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["completed_steps"] == 4
    assert (out / "adapter_model.safetensors").is_file()


def test_ray_job_submit_runs_the_controller_to_promotion_and_eval(head_cluster, tiny_llama, tmp_path):
    """What k8s/rayjob-finetune.yaml runs: `clusterft jobs submit --wait` as a Ray job (the controller
    trains, evaluates on the engine, registers and promotes), then `clusterft eval` as another."""
    workdir = tmp_path / "job"
    workdir.mkdir()
    shared = tmp_path / "shared"
    job = {
        "model_name_or_path": str(tiny_llama),
        "finetuning_type": "lora",
        "dataset": "demo_tasks",
        "dataset_dir": str(EXAMPLES),
        "template": "chatml",
        "cutoff_len": 48,
        "max_samples": 32,
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "save_steps": 2,
        "learning_rate": 1e-2,
        "output_dir": str(shared / "out"),
        "cluster": {"num_workers": 2},
        "eval": {"dataset": ["demo_tasks_eval"], "max_samples": 4, "max_new_tokens": 8},
        "promote": {"model_name": "submitted"},
    }
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    bin_dir = Path(sys.executable).parent
    env = json.dumps(
        {
            "env_vars": {
                "CLUSTERFT_HOME": str(shared / "controller"),
                "CLUSTERFT_REGISTRY": str(shared / "registry"),
            }
        }
    )
    submit = [RAY, "job", "submit", "--address", head_cluster, "--working-dir", str(workdir)]
    submit += ["--runtime-env-json", env, "--"]
    result = submit_when_ready(
        [*submit, str(bin_dir / "clusterft"), "jobs", "submit", "job.yaml", "--wait", "--no-progress"]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from clusterft.controller.registry import Registry

    assert Registry(shared / "registry").aliases("submitted")["production"] == "v0001"

    # Evaluate the run's adapter (registered versions are immutable: eval.json goes next to the run's).
    evaluate = [str(bin_dir / "clusterft"), "eval", str(shared / "out"), "--dataset", "demo_tasks_eval"]
    evaluate += ["--dataset-dir", str(EXAMPLES), "--template", "chatml", "--max-samples", "4", "--json"]
    result = submit_when_ready([*submit, *evaluate])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"exact_match"' in result.stdout and '"num_examples": 4' in result.stdout
