"""`ray job submit` end to end, as the README runs it: a `ray start --head --block` cluster runs the
training job and the controller's whole pipeline submitted to it, and the CLI then reads what they
left on shared storage (`clusterft checkpoints`, `clusterft jobs list|status|logs`).

The head lives in a private temp dir with private ports. It is stopped the README's way, `kill` of the
`ray start --block` process, which stops that cluster only (`ray stop` would stop every Ray cluster on
the machine, other tests' included); teardown fails if any of its processes outlive that.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusterft.ports import free_ports
from tests.ray_processes import started, stop_and_check
from tests.train.helpers import EXAMPLES

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
RAY, CLUSTERFT = str(BIN / "ray"), str(BIN / "clusterft")  # the console scripts, as a user runs them
FIXED_PORTS = (
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "ray-client-server",
    "runtime-env-agent",
    "metrics-export",
)


@pytest.fixture(scope="module")
def head_cluster():
    temp_dir = tempfile.mkdtemp(prefix="cfthead", dir="/tmp")
    gcs_port, dashboard_port, *ports = free_ports(2 + len(FIXED_PORTS))
    command = [
        *(RAY, "start", "--head", "--num-cpus=2", "--block", f"--temp-dir={temp_dir}"),
        *(f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"),
        "--disable-usage-stats",
        # Every listening port of its own: with the defaults (e.g. the job agent's 52365) a second Ray
        # cluster on the machine leaves this one without a job agent ("No available agent").
        *(f"--{name}-port={port}" for name, port in zip(FIXED_PORTS, ports, strict=True)),
    ]
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    with started(command, temp_dir, f"{dashboard}/api/version") as head:
        yield dashboard
        stop_and_check(head, signal.SIGTERM, temp_dir)  # the README's `kill "$RAY_HEAD"`


def lora_job(tiny_llama: Path, saves: Path, **sections: Any) -> dict[str, Any]:
    """A 4-step LoRA job laid out like jobs/quickstart.yaml: output in saves/quickstart, checkpoints
    in saves/storage/quickstart/bundles (absolute: the job runs in Ray's copy of the working dir)."""
    return {
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
        "output_dir": str(saves / "quickstart"),
        "checkpoint": {"storage_path": str(saves / "storage")},
        "cluster": {"num_workers": 2},
        **sections,
    }


def write_job(workdir: Path, job: dict[str, Any]) -> None:
    workdir.mkdir()
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))


def clusterft(*words: str, env: dict[str, str] | None = None) -> str:
    """Run the `clusterft` console script on this host; its stdout (stderr too on failure)."""
    result = subprocess.run(
        [CLUSTERFT, *words], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, (
        f"clusterft {' '.join(words)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    )
    return result.stdout


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
    write_job(tmp_path / "job", lora_job(tiny_llama, tmp_path / "saves"))
    submit = [RAY, "job", "submit", "--address", head_cluster, "--working-dir", str(tmp_path / "job"), "--"]
    result = submit_when_ready([*submit, CLUSTERFT, "train", "job.yaml", "--no-progress"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "saves" / "quickstart"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["completed_steps"] == 4
    assert (out / "adapter_model.safetensors").is_file()

    # The README's next lines: the run's bundles, listed, then every sha256 checked.
    bundles = str(tmp_path / "saves" / "storage" / "quickstart" / "bundles")
    listed = re.findall(
        r"^step_\d+\s+step\s+(\d+)\s.*\bvalid$", clusterft("checkpoints", "list", bundles), re.M
    )
    assert listed == ["2", "4"]
    verified = clusterft("checkpoints", "verify", bundles)
    assert re.findall(r"step\s+(\d+)\s.*\bvalid$", verified, re.M) == ["2", "4"], verified


def test_ray_job_submit_runs_the_controller_to_promotion_and_eval(head_cluster, tiny_llama, tmp_path):
    """What k8s/rayjob-finetune.yaml runs: `clusterft jobs submit --wait` as a Ray job (the controller
    trains, evaluates on the engine, registers and promotes), then `clusterft eval` as another. Between
    them the README's `clusterft jobs list|status|logs` read the job store on the host."""
    shared = tmp_path / "shared"
    eval_section = {"dataset": ["demo_tasks_eval"], "max_samples": 4, "max_new_tokens": 8}
    job = lora_job(tiny_llama, shared, eval=eval_section, promote={"model_name": "quickstart", "auto": True})
    write_job(tmp_path / "job", job)
    stores = {"CLUSTERFT_HOME": str(shared / "controller"), "CLUSTERFT_REGISTRY": str(shared / "registry")}
    submit = [RAY, "job", "submit", "--address", head_cluster, "--working-dir", str(tmp_path / "job")]
    submit += ["--runtime-env-json", json.dumps({"env_vars": stores}), "--"]
    result = submit_when_ready([*submit, CLUSTERFT, "jobs", "submit", "job.yaml", "--wait", "--no-progress"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from clusterft.registry.registry import Registry

    assert Registry(shared / "registry").aliases("quickstart")["production"] == "v0001"

    [row] = clusterft("jobs", "list", env=stores).splitlines()[1:]
    job_id, name, status, steps = row.split()[:4]
    assert (name, status, steps) == ("quickstart", "promoted", "4/4")
    status = clusterft("jobs", "status", job_id, env=stores)
    assert status.startswith(f"{job_id}  quickstart  promoted")
    assert "registered -> promoted" in status and "version: v0001" in status, status
    # The drivers ran as Ray jobs of this head; naming its job server keeps the log read off Ray's
    # auto-detection, which refuses to choose when another Ray cluster runs on the machine.
    server = {**stores, "RAY_API_SERVER_ADDRESS": head_cluster}
    logs = clusterft("jobs", "logs", job_id, "--follow", env=server)  # returns: the job has settled
    headers = re.findall(r"^==> (.+) <==$", logs, re.M)
    from clusterft.controller.ray_jobs import pointer, submission_id

    phases = [pointer(submission_id(job_id, 1, phase)) for phase in ("train", "eval")]
    assert headers == phases, logs[-2000:]  # the drivers' Ray jobs, as they ran
    assert "train result: ok=True" in logs

    # Evaluate the run's adapter (registered versions are immutable: eval.json goes next to the run's).
    evaluate = [CLUSTERFT, "eval", job["output_dir"], "--dataset", "demo_tasks_eval"]
    evaluate += ["--dataset-dir", str(EXAMPLES), "--template", "chatml", "--max-samples", "4", "--json"]
    result = submit_when_ready([*submit, *evaluate])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"exact_match"' in result.stdout and '"num_examples": 4' in result.stdout
