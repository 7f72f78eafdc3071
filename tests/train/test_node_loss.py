"""Node loss on a real multi-node Ray cluster (tests/multinode.py): a head and two worker nodes,
each its own raylet; a whole worker node is SIGKILLed mid-run."""

from __future__ import annotations

import os

import pytest

from tests.multinode import HEAD, multinode_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_kill_node_kills_exactly_that_node_and_it_comes_back(multinode_cluster):  # noqa: F811
    """The helper's contract: an actor pinned to node_a dies with node_a (raylet and workers
    SIGKILLed), node_b's actor lives on, the GCS marks node_a dead, and a restarted node_a
    takes work again under the same label."""
    import ray

    cluster = multinode_cluster
    ray.init(address=cluster.address, log_to_driver=False)
    try:

        @ray.remote(num_cpus=1)
        class Where:
            def pid(self) -> int:
                return os.getpid()

        on_a = Where.options(resources={"node_a": 1}).remote()
        on_b = Where.options(resources={"node_b": 1}).remote()
        pid_a, pid_b = ray.get([on_a.pid.remote(), on_b.pid.remote()])
        assert pid_a in cluster.node_pids("node_a") and pid_b in cluster.node_pids("node_b")
        head_pids, b_pids = set(cluster.node_pids(HEAD)), set(cluster.node_pids("node_b"))

        killed = cluster.kill_node("node_a")
        assert pid_a in killed and not (set(killed) & (head_pids | b_pids))
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(on_a.pid.remote(), timeout=120)
        cluster.wait_dead("node_a")
        assert ray.get(on_b.pid.remote()) == pid_b
        assert set(cluster.node_pids("node_b")) >= b_pids

        cluster.start_node("node_a")
        assert cluster.alive() == {HEAD: True, "node_a": True, "node_b": True}
        again = Where.options(resources={"node_a": 1}).remote()
        assert ray.get(again.pid.remote()) in cluster.node_pids("node_a")
    finally:
        ray.shutdown()
