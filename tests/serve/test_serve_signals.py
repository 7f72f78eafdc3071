"""`clusterft serve` in a process of its own, stopped the way a process manager stops it: `kill PID`
(SIGTERM, what systemd, Kubernetes and `timeout` send) must shut Serve and the local Ray cluster down as
Ctrl-C does, exit 0 and leave none of that cluster's processes. Before, Ray's own SIGTERM handler ran
(`sys.exit`, with no Serve shutdown) and the process died of SIGABRT (-6) on the way out."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from clusterft.ports import free_port
from tests.ray_processes import started, stop_and_check

pytestmark = pytest.mark.slow

CLUSTERFT = str(Path(sys.executable).parent / "clusterft")


def test_sigterm_stops_serve_and_its_ray_cluster(tiny_llama: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray_tmp = tempfile.mkdtemp(prefix="cftsigterm", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CLUSTERFT_API_KEY")}
    command = [CLUSTERFT, "serve", str(tiny_llama), "--port", str(port), "--served-model-name", "tiny"]
    with started(command, ray_tmp, f"{url}/health", env={**env, "RAY_TMPDIR": ray_tmp}) as server:
        reply = httpx.post(
            f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=60
        )
        assert reply.status_code == 200, reply.text
        assert stop_and_check(server, signal.SIGTERM, ray_tmp) == 0
