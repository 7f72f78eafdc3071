"""The multi-node harness itself: a node whose `ray start` fails is cleared away and started
again on fresh ports, with the failure in a warning. (A real failed start is slow: `ray start`
gives up on a GCS whose port is taken after ~42 s here, on a raylet that never registers after
30 s; so the failed attempts are stand-ins that leave a process of the node running, as a real
failed start does.)"""

from __future__ import annotations

import subprocess

import pytest

from tests.multinode import HEAD, MARKER, MultiNodeCluster


def failing_starts(cluster: MultiNodeCluster, failures: int, left: list[subprocess.Popen[bytes]]):
    """A `_ray_start` whose first `failures` calls start only a stray process of the node and fail."""
    real = cluster._ray_start

    def start(name: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        if len(left) == failures:
            return real(name, timeout_s)
        env = {MARKER: cluster._marker(name)}
        left.append(subprocess.Popen(["sleep", "300"], env=env))
        cluster.nodes[name].log.append(f"stand-in failure {len(left)}, port {cluster.gcs_port}")
        return subprocess.CompletedProcess(["ray", "start"], 1, "", "")

    return start


def test_a_head_whose_start_fails_is_started_again_on_fresh_ports(monkeypatch):
    cluster, strays = MultiNodeCluster(worker_nodes={"node_a": 1}), []
    first_port = cluster.gcs_port
    monkeypatch.setattr(cluster, "_ray_start", failing_starts(cluster, 1, strays))
    with pytest.warns(UserWarning, match="ray start of head failed; trying again") as caught, cluster:
        assert strays[0].poll() == -9  # what the failed start left running was killed
        assert cluster.gcs_port != first_port
        assert cluster.alive() == {HEAD: True, "node_a": True}
        assert cluster.nodes[HEAD].starts == 1 and len(cluster.nodes[HEAD].log) == 2
    assert f"stand-in failure 1, port {first_port}" in str(caught[0].message)
    assert not cluster.node_pids(HEAD) and not cluster.node_pids("node_a")


def test_a_node_that_never_starts_fails_with_every_attempt(monkeypatch):
    cluster, strays = MultiNodeCluster(worker_nodes={"node_a": 1}), []
    monkeypatch.setattr(cluster, "_ray_start", failing_starts(cluster, 3, strays))
    with pytest.warns(UserWarning), pytest.raises(AssertionError, match="failed 3 times") as failed, cluster:
        pass
    assert [f"stand-in failure {n}" in str(failed.value) for n in (1, 2, 3)] == [True] * 3
    assert "no raylet or GCS logs" in str(failed.value)
    assert [stray.poll() for stray in strays] == [-9] * 3
