"""A real multi-node Ray cluster on this one machine, for tests of node loss and failover.

    head (ray start --head, --num-cpus=0 by default: GCS, dashboard, drivers' actors)
     ├── node_a (ray start --address=HEAD, its own raylet, ports, temp dir, {"node_a": 1})
     └── node_b (ray start --address=HEAD, ...                              {"node_b": 1})

Every process a node starts (raylet, agents, log monitor, the workers its raylet forks) inherits
the environment of its `ray start`, so each node's `ray start` gets its own CLUSTERFT_TEST_NODE
marker: that marker (and descent from a marked process, for a worker whose title overwrote its
environment) finds exactly one node's processes to SIGKILL, and never another engineer's cluster.
Every port is a free one and every node has its own temp dir: nothing is shared with the
default ports or /tmp/ray that local clusters use. `ray stop` (which stops every Ray process on
the host) is never used.

    with MultiNodeCluster(worker_nodes={"node_a": 1, "node_b": 1}) as cluster:
        ray.init(address=cluster.address)
        cluster.kill_node("node_a")      # raylet + every process of that node, SIGKILL
        cluster.start_node("node_a")     # back, same label and CPUs, fresh ports
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from clusterft.ports import free_ports

MARKER = "CLUSTERFT_TEST_NODE"
# The GCS declares a node dead after `failure_threshold` health checks in a row, one every
# `period_ms`, fail. Ray's defaults (5 of 3 s, after a 5 s initial delay) take ~15 s to notice a lost
# node; 10 of 1 s take ~10 s here. Fewer checks would notice sooner but declare live nodes of this
# loaded machine dead (a raylet stalled for seconds); real clusters set the same keys through
# `ray start --system-config` or RAY_health_check_* (k8s/raycluster.yaml).
NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "10"}
HEAD = "head"
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class Node:
    """One `ray start` of the cluster: its label resource, CPUs and temp dir."""

    name: str
    num_cpus: int
    temp_dir: Path
    starts: int = 0
    killed_at: float | None = None  # time.time() of the last kill_node
    log: list[str] = field(default_factory=list)


class MultiNodeCluster:
    """A head and worker nodes started with `ray start`, each its own raylet, on free ports.

    `worker_nodes` maps each worker node's name to its CPUs; the name is also a custom resource
    ({name: 1}) that pins work to the node; `resources` adds custom resources to named worker nodes
    (a label several nodes share, e.g. {"drv_a": {"driver": 1}, "drv_b": {"driver": 1}}). `env` is
    added to every node's environment (Ray config such as RAY_health_check_period_ms goes there);
    workers inherit it."""

    def __init__(
        self,
        worker_nodes: dict[str, int] | None = None,
        head_cpus: int = 0,
        env: dict[str, str] | None = None,
        root: Path | None = None,
        resources: dict[str, dict[str, float]] | None = None,
    ):
        # short root: Ray's unix sockets live under it and a socket path has at most 107 bytes
        self.root = Path(root or tempfile.mkdtemp(prefix="cftmn", dir="/tmp"))
        self.cluster_id = self.root.name
        self.env = {**os.environ, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)  # `ray start --head` must not join another cluster
        self.nodes = {HEAD: Node(HEAD, head_cpus, self.root / HEAD)}
        for name, cpus in (worker_nodes or {"node_a": 1, "node_b": 1}).items():
            assert name != HEAD and name.isidentifier(), f"bad node name {name!r}"
            self.nodes[name] = Node(name, cpus, self.root / name)
        self.resources = resources or {}
        assert self.resources.keys() <= self.nodes.keys() - {HEAD}, (
            f"resources for unknown nodes: {resources}"
        )
        self.gcs_port, self.dashboard_port = free_ports(2)

    @property
    def address(self) -> str:
        """The GCS address that `ray.init(address=...)` and `ray start --address` take."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard (jobs API) address that `ray job submit --address` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> MultiNodeCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout_s: float = 120) -> None:
        """Start the head, then every worker node; wait until all are alive in the GCS."""
        self.start_node(HEAD, timeout_s)
        for name in self.nodes:
            if name != HEAD:
                self.start_node(name, timeout_s)

    def start_node(self, name: str, timeout_s: float = 120, attempts: int = 3) -> None:
        """(Re)start node `name` with fresh ports and the same label and CPUs; returns once the
        GCS lists it alive. A start that fails (`ray start` gives a raylet 30 s to register, which a
        loaded machine can miss) is cleared away and tried again on fresh ports, `attempts` times in
        all, with a warning that carries its logs."""
        node = self.nodes[name]
        assert not self.node_pids(name), f"{name} is still running: kill_node it first"
        failures: list[str] = []
        for attempt in range(1, attempts + 1):
            if name == HEAD and attempt > 1:  # nothing has joined yet: the GCS may move
                self.gcs_port, self.dashboard_port = free_ports(2)
            done = self._ray_start(name, timeout_s)
            if done.returncode == 0:
                break
            failures.append(f"attempt {attempt}: {node.log[-1]}\n{self._log_tails(name)}")
            self._sigkill(name)  # what the failed start left running
            if attempt < attempts:
                warnings.warn(f"ray start of {name} failed; trying again:\n{failures[-1]}", stacklevel=2)
        else:
            raise AssertionError(f"ray start of {name} failed {attempts} times:\n" + "\n".join(failures))
        node.starts += 1
        self.wait_alive([name], timeout_s)

    def _ray_start(self, name: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        node = self.nodes[name]
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        command = [RAY, "start", f"--num-cpus={node.num_cpus}", f"--temp-dir={node.temp_dir}"]
        ports = iter(free_ports(7))
        command += ["--disable-usage-stats", f"--node-manager-port={next(ports)}"]
        command += [f"--object-manager-port={next(ports)}", f"--metrics-export-port={next(ports)}"]
        command += [
            f"--dashboard-agent-listen-port={next(ports)}",
            f"--dashboard-agent-grpc-port={next(ports)}",
        ]
        command += [f"--runtime-env-agent-port={next(ports)}"]
        if name == HEAD:
            command += ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={next(ports)}"]
            command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            labels = {**self.resources.get(name, {}), name: 1}
            command += [f"--address={self.address}", f"--resources={json.dumps(labels)}"]
        env = {**self.env, MARKER: self._marker(name)}
        run = {"env": env, "cwd": REPO, "capture_output": True, "text": True, "timeout": timeout_s}
        try:
            done = subprocess.run(command, **run)
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(command, -1, "", f"ray start timed out after {timeout_s} s")
        node.log.append(done.stdout[-2000:] + done.stderr[-2000:])
        return done

    def _log_tails(self, name: str, lines: int = 15) -> str:
        """The last lines of the raylet's and GCS's logs of node `name`'s latest session: why a
        start failed is written there, not to `ray start`'s output."""
        logs = self.nodes[name].temp_dir / "session_latest" / "logs"
        tails = []
        for path in sorted([*logs.glob("raylet.*"), *logs.glob("gcs_server.*")]):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                tails.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(tails) or f"(no raylet or GCS logs under {logs})"

    def kill_node(self, name: str, timeout_s: float = 30) -> list[int]:
        """SIGKILL every process of node `name` (raylet, agents, workers) at once, as a machine
        that loses power; waits until they are gone and returns their pids. The GCS learns of it
        only through its health checks, as it would of a real node."""
        assert name != HEAD, "kill_node is for worker nodes; the head holds the GCS"
        assert self.node_pids(name), f"{name} has no processes to kill"
        self.nodes[name].killed_at = time.time()
        return self._sigkill(name, timeout_s)

    def _sigkill(self, name: str, timeout_s: float = 30) -> list[int]:
        """SIGKILL every process of node `name`; waits until they are gone and returns their pids."""
        pids = self.node_pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        left = self._wait_gone(name, timeout_s)
        assert not left, f"processes of {name} outlived SIGKILL: {left}"
        return pids

    def node_pids(self, name: str) -> list[int]:
        """The live processes of node `name`: marked with its marker, or descended from one."""
        marker = f"\0{MARKER}={self._marker(name)}\0".encode()
        parents: dict[int, int] = {}
        marked: set[int] = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            pid = int(proc.name)
            try:
                stat = (proc / "stat").read_text()
                environ = b"\0" + (proc / "environ").read_bytes()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie is dead already; its parent reaps it
                continue
            parents[pid] = int(fields[1])
            if marker in environ:
                marked.add(pid)
        found = set(marked)
        grew = True
        while grew:  # add descendants of the node's processes
            more = {pid for pid, parent in parents.items() if parent in found} - found
            found |= more
            grew = bool(more)
        return sorted(found)

    def alive(self) -> dict[str, bool]:
        """Whether the GCS lists each node as alive (a killed node stays alive there until its
        health checks fail)."""
        live = set(self.live_node_ids().values())
        return {name: name in live for name in self.nodes}

    def live_node_ids(self) -> dict[str, str]:
        """Node id (hex) -> name of every node the GCS lists as alive (a restarted node has a new id)."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10).values()
        live = {}
        for info in infos:
            if info.state != GcsNodeInfo.GcsNodeState.ALIVE:
                continue
            names = [HEAD] if info.is_head_node else [n for n in self.nodes if info.resources_total.get(n)]
            for name in names:
                live[info.node_id.hex()] = name
        return live

    def wait_alive(self, names: list[str] | None = None, timeout_s: float = 120) -> None:
        """Wait until the GCS lists every node in `names` (default all) as alive."""
        names = names or list(self.nodes)
        deadline = time.monotonic() + timeout_s
        while not all((state := self.alive())[name] for name in names):
            assert time.monotonic() < deadline, f"nodes not alive after {timeout_s} s: {state}"
            time.sleep(0.2)

    def wait_dead(self, name: str, timeout_s: float = 120) -> float:
        """Wait until the GCS no longer lists node `name` alive; returns seconds since its kill."""
        deadline = time.monotonic() + timeout_s
        while self.alive()[name]:
            assert time.monotonic() < deadline, f"GCS still lists {name} alive after {timeout_s} s"
            time.sleep(0.2)
        return time.time() - (self.nodes[name].killed_at or time.time())

    def stop(self) -> None:
        """Stop every process of every node (worker nodes first, then the head): SIGTERM, then
        SIGKILL what is left after 10 s (1 s on the head, whose GCS and autoscaler outlive SIGTERM
        by more than 15 s, and hold nothing a later test needs); the root dir is deleted."""
        for name in [*(n for n in self.nodes if n != HEAD), HEAD]:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.node_pids(name):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                if not self._wait_gone(name, 1 if name == HEAD else 10):
                    break
        left = {name: pids for name in self.nodes if (pids := self.node_pids(name))}
        shutil.rmtree(self.root, ignore_errors=True)
        assert not left, f"processes of the multi-node cluster outlived SIGKILL: {left}"

    def _marker(self, name: str) -> str:
        return f"{self.cluster_id}/{name}"

    def _wait_gone(self, name: str, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while (left := self.node_pids(name)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left


@pytest.fixture
def multinode_cluster() -> Iterator[MultiNodeCluster]:
    """A head (0 CPUs) and two 1-CPU worker nodes, node_a and node_b; the test's driver is not
    connected (ray.init(address=cluster.address) to connect, ray.shutdown() before the end)."""
    with MultiNodeCluster() as cluster:
        yield cluster
