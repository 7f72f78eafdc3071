"""deployments/serve_config.yaml through Ray's own Serve CLI, the way README.md tells a reader to run
it: `serve run` (a local cluster it starts; Ctrl-C stops it and leaves none of its Ray processes) and
`serve deploy` to a running `ray start --head` (through its dashboard's REST API), each serving the
registry's `production` version of `quickstart`.

The config runs as shipped but for what a shared test machine needs: a free port instead of 8000 and
127.0.0.1 instead of Serve's 0.0.0.0; the test asserts that nothing else differs. The API key comes
from $CLUSTERFT_API_KEY, as the k8s manifests give it (the app refuses to build without one). Each Ray cluster
lives in a private temp dir, and is found and stopped by it (tests/ray_processes.py), never `ray stop`.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from clusterft.ports import free_port
from clusterft.registry.registry import Registry
from tests.ray_processes import http_ok, ray_head, started, stop_and_check, wait_for_exit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deployments" / "serve_config.yaml"
SERVE = str(Path(sys.executable).parent / "serve")


@pytest.fixture(scope="module")
def registry(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry whose `production` alias of `quickstart` is v0001, the tiny model."""
    root = tmp_path_factory.mktemp("cli-registry")
    Registry(root).register("quickstart", tiny_llama, kind="full")
    Registry(root).promote("quickstart", "v1")
    return root


def config_copy(directory: Path, port: int) -> Path:
    """deployments/serve_config.yaml with only the HTTP port and host changed, written to `directory`."""
    shipped = yaml.safe_load(CONFIG.read_text())
    config = copy.deepcopy(shipped)
    config["http_options"].update(port=port, host="127.0.0.1")
    path = directory / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    written = yaml.safe_load(path.read_text())
    assert written["http_options"] == {**shipped["http_options"], "port": port, "host": "127.0.0.1"}
    assert {k: v for k, v in written.items() if k != "http_options"} == {
        k: v for k, v in shipped.items() if k != "http_options"
    }, "the test must run the shipped config, changing nothing but http_options.port/host"
    return path


API_KEY = "sk-serve-config-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def cli_env(registry: Path, **extra: str) -> dict[str, str]:
    """This process's env (RAY_AUTH_MODE=disabled & co., see clusterft.runtime) with the registry,
    and no inherited cluster address that would send the CLI to someone else's cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, "CLUSTERFT_REGISTRY": str(registry), "CLUSTERFT_API_KEY": API_KEY, **extra}


def check_serving(url: str, timeout_s: float = 120) -> None:
    """Wait until /v1/models lists quickstart v0001, then ask for a completion."""
    deadline = time.monotonic() + timeout_s
    models = None
    while True:
        try:
            reply = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10)
            models = (
                [(m["id"], m["version"]) for m in reply.json()["data"]]
                if reply.status_code == 200
                else reply.text
            )
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            models = repr(exc)
        if models == [("quickstart", "v0001")]:
            break
        assert time.monotonic() < deadline, f"{url}/v1/models after {timeout_s} s: {models}"
        time.sleep(0.5)
    body = {"model": "quickstart", "prompt": "hello there", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    completion = reply.json()
    assert completion["model"] == "quickstart" and completion["choices"][0]["text"], completion
    assert 0 < completion["usage"]["completion_tokens"] <= 4, completion


def test_serve_run_serves_the_config_and_ctrl_c_stops_its_cluster(registry: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = config_copy(tmp_path, port)
    # RAY_TMPDIR: the cluster `serve run` starts (its ray.init) puts its session there, so its
    # processes are told apart from every other cluster on the machine by that path.
    ray_tmp = tempfile.mkdtemp(prefix="cftserverun", dir="/tmp")
    env = cli_env(registry, RAY_TMPDIR=ray_tmp)
    command = [SERVE, "run", str(config)]
    with started(command, ray_tmp, f"{url}/health", 120, cwd=ROOT, env=env) as server:
        check_serving(url)
        assert stop_and_check(server, signal.SIGINT, ray_tmp) == 0  # Ctrl-C


def test_serve_deploy_to_a_running_cluster_then_shutdown(registry: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = config_copy(tmp_path, port)
    ray_tmp = tempfile.mkdtemp(prefix="cftservedeploy", dir="/tmp")
    env = cli_env(registry)
    # cwd: the head's workers (the app build task among them) start there, so `deployments.app` imports.
    with ray_head(ray_tmp, cwd=ROOT, env=env) as dashboard:

        def serve_cli(*args: str) -> str:
            done = subprocess.run(
                [SERVE, *args, "--address", dashboard], env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, (
                f"serve {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
            return done.stdout + done.stderr

        serve_cli("deploy", str(config))
        check_serving(url)
        serve_cli("shutdown", "-y")
        deadline = time.monotonic() + 60
        while http_ok(f"{url}/health"):  # the shutdown is asynchronous
            assert time.monotonic() < deadline, "serve shutdown left the app serving for 60 s"
            time.sleep(0.5)
    assert not wait_for_exit(ray_tmp, 0), "processes of the head's cluster are left"
