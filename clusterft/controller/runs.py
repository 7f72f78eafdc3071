"""The processes the controller starts for a job: one training driver per attempt, one evaluation.

Each runs `python -m clusterft.cli.run_job PHASE --job ID ...` in its own session, with its
output, pid and result in files under the controller's root on shared storage:

    <root>/runs/<job_id>/attempt-<n>/train.log    train.pid    train.result.json
                                     eval.log     eval.pid     eval.result.json

The files, not the `Popen` object, are the truth: a restarted controller re-attaches to a driver
that outlived its predecessor (by pid, checked against the command line so a reused pid is not
mistaken for it) and reads the result a driver wrote while no controller was watching.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clusterft.controller.store_backend import STORE_URL_ENV, is_store_url
from clusterft.storage.fs import atomic_write_text

Phase = Literal["train", "eval"]


@dataclass
class RunFiles:
    """Where one phase of one attempt of a job keeps its log, pid and result."""

    dir: Path
    phase: Phase

    @classmethod
    def of(cls, root: Path, job_id: str, attempt: int, phase: Phase) -> RunFiles:
        return cls(root / "runs" / job_id / f"attempt-{attempt}", phase)

    @property
    def log(self) -> Path:
        return self.dir / f"{self.phase}.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / f"{self.phase}.pid"

    @property
    def result(self) -> Path:
        return self.dir / f"{self.phase}.result.json"

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def read_result(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.result.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def write_result(self, result: dict[str, Any]) -> None:
        atomic_write_text(self.result, json.dumps(result, indent=2) + "\n")


def pid_runs_job(pid: int, job_id: str) -> bool:
    """Whether `pid` is alive and is a driver of `job_id` (a recycled pid belongs to someone else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return status != "Z" and job_id.encode() in cmdline


def driver_command(files: RunFiles, job_id: str, store: str | Path) -> tuple[list[str], dict[str, str]]:
    """The phase's driver command line and the environment it adds: a SQLite store goes on the
    command line (--store wins over the environment's URL), a URL in the environment, never on a
    command line or in a log, where a password would show."""
    where, env = ["--store", str(store)], {}
    if is_store_url(store):
        where, env = [], {STORE_URL_ENV: str(store)}
    command = [sys.executable, "-m", "clusterft.cli.run_job", files.phase, "--job", job_id, *where]
    return [*command, "--out", str(files.dir)], env


def prepare(files: RunFiles) -> None:
    """A new attempt's run folder: made, and its phase's result of an earlier launch gone."""
    files.dir.mkdir(parents=True, exist_ok=True)
    files.result.unlink(missing_ok=True)


def launch(files: RunFiles, job_id: str, store: str | Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the phase's driver as a process of this host, which reads its job from `store` (a SQLite
    file or a URL); its pid is on disk before this returns."""
    prepare(files)
    command, store_env = driver_command(files, job_id, store)
    env = {**env, **store_env}
    with open(files.log, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        # Own session: cancel kills the driver's whole process group, and a killed controller's
        # process group (or terminal) does not take the driver with it.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=files.dir, start_new_session=True,
        )  # fmt: skip
    atomic_write_text(files.pid_file, str(process.pid))
    return process


def kill_drivers(root: Path, job_id: str, attempt: int) -> None:
    """Stop whichever driver of the job's attempt still runs (train or eval), found by its pid file."""
    phases: tuple[Phase, ...] = ("train", "eval")
    for phase in phases:
        pid = RunFiles.of(root, job_id, attempt, phase).read_pid()
        if pid is not None and pid_runs_job(pid, job_id):
            kill(pid)


def kill(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the driver's process group, SIGKILL whatever is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "was gone when the controller looked (it died while no controller watched)"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
