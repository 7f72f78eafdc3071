"""Ray clusters a test starts in a process of its own (`ray start`, `clusterft serve`), found and
stopped by their private temp dir: never `ray stop`, which stops every Ray process on the machine,
other tests' clusters included."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from clusterft.ports import free_port


def http_ok(url: str) -> bool:
    """Whether `url` answers 200 now (a server still starting refuses, or errors)."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def cluster_pids(temp_dir: str) -> list[int]:
    """The processes whose command line names `temp_dir` (every Ray process of that cluster does)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def wait_for_exit(temp_dir: str, timeout_s: float) -> list[int]:
    """Wait until no process of the cluster in `temp_dir` is left; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while (left := cluster_pids(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop_cluster(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process of the cluster in `temp_dir`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        wait_for_exit(temp_dir, 10)


def sigint_default() -> None:
    """In the child: Ctrl-C's default action even when pytest runs with SIGINT ignored (started in the
    background by a shell without job control, as CI may be), so that Python turns it into a
    KeyboardInterrupt as it does in a reader's terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def started(
    command: list[str], temp_dir: str, ready_url: str, timeout_s: float = 180, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command`, whose Ray cluster lives in `temp_dir`, until `ready_url` answers; yields the
    process. Afterwards whatever is left of it and its cluster is killed and `temp_dir` deleted."""
    log = Path(temp_dir) / "command.log"
    with open(log, "wb") as out:
        popen.setdefault("preexec_fn", sigint_default)
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **popen)
    try:
        deadline = time.monotonic() + timeout_s
        while not http_ok(ready_url):
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, f"{ready_url} never answered"
            time.sleep(0.5)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_and_check(process: subprocess.Popen[bytes], sig: int, temp_dir: str) -> int:
    """Send `sig` the way a reader stops it (Ctrl-C, `kill`); fails if any process of its cluster
    outlives it by 30 s. Returns its exit code."""
    process.send_signal(sig)
    code = process.wait(timeout=60)
    left = wait_for_exit(temp_dir, 30)
    assert not left, f"{signal.Signals(sig).name} left processes of its Ray cluster running: {left}"
    return code


@contextlib.contextmanager
def ray_head(temp_dir: str, num_cpus: int = 2, timeout_s: float = 60, **run: Any) -> Iterator[str]:
    """`ray start --head` with the dashboard on 127.0.0.1, every fixed default port (GCS 6379,
    dashboard 8265, its agent 52365, Ray Client 10001) replaced by a free one and its processes in
    `temp_dir`; yields the dashboard's address (what `serve deploy --address` takes). `run` goes to
    subprocess.run (env, cwd: the Ray workers inherit both). Afterwards the cluster is stopped by its
    temp dir and `temp_dir` deleted."""
    dashboard = free_port()
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--num-cpus={num_cpus}"]
    command += [f"--temp-dir={temp_dir}", f"--port={free_port()}", f"--ray-client-server-port={free_port()}"]
    command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    command += [f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
    try:
        started = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, **run)
        assert started.returncode == 0, (
            f"ray start --head failed:\n{started.stdout[-3000:]}{started.stderr[-3000:]}"
        )
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
