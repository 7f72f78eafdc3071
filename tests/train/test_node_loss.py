"""Node loss on a real multi-node Ray cluster (tests/multinode.py): a head and two worker nodes,
each its own raylet; a whole worker node is SIGKILLed mid-run."""

from __future__ import annotations

import os
import threading
import time
from typing import ClassVar

import pytest
import torch

from clusterft.train.launcher import run_training
from tests.multinode import HEAD, MultiNodeCluster, multinode_cluster  # noqa: F401  (fixture)
from tests.train.helpers import bundles, final_weights, make_job

pytestmark = pytest.mark.slow
CLOCK = "tests.train.test_node_loss.StepClock"
STEPS = 200


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


class StepClock:
    """A user callback (named by dotted path) stamping each step the driver hears of."""

    steps: ClassVar[list[tuple[float, dict]]] = []

    def on_step_end(self, metrics: dict) -> None:
        self.steps.append((time.time(), metrics))


class NodeKiller(threading.Thread):
    """SIGKILLs worker node `node` as soon as a bundle of step >= `after_step` is published, then
    starts it again (a machine rebooting into the cluster)."""

    def __init__(self, cluster: MultiNodeCluster, spec, node: str, after_step: int):
        super().__init__(daemon=True)
        self.cluster, self.spec, self.node, self.after_step = cluster, spec, node, after_step
        self.killed_at: float | None = None
        self.killed_at_step: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            store, deadline = bundles(self.spec), time.time() + 300
            while self.killed_at is None and time.time() < deadline:
                steps = [info.step for info in store.list(verify=False)]
                if steps and max(steps) >= self.after_step:
                    self.cluster.kill_node(self.node)
                    self.killed_at, self.killed_at_step = self.cluster.nodes[self.node].killed_at, max(steps)
                time.sleep(0.01)
            if self.killed_at is not None:
                self.cluster.start_node(self.node)
        except BaseException as err:  # reported by the test, not lost in the thread
            self.error = err


def first_step_after(moment: float) -> tuple[float, dict]:
    return next((at, step) for at, step in StepClock.steps if at > moment and step["attempt"] > 1)


def test_killed_node_resumes_from_newest_bundle_bitwise(multinode_cluster, tiny_llama, tmp_path):  # noqa: F811
    """2 workers, one per worker node; node_b (raylet and workers) is SIGKILLed after the step-2
    bundle and rebooted: the run resumes from its newest valid bundle on 2 workers and ends with
    the planned steps and the uninterrupted run's weights, bit for bit."""
    import ray

    cluster = multinode_cluster
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        job = {"max_steps": 10, "save_steps": 2, "callbacks": [CLOCK]}
        reference = make_job(tiny_llama, tmp_path / "reference", **job)
        assert run_training(reference, show_progress=False).ok
        StepClock.steps.clear()
        spec = make_job(tiny_llama, tmp_path / "killed", **job)
        killer = NodeKiller(cluster, spec, "node_b", after_step=2)
        killer.start()
        summary = run_training(spec, show_progress=False)
        killer.join(timeout=120)
    finally:
        ray.shutdown()
    assert killer.error is None, killer.error
    assert killer.killed_at is not None, "the run ended before node_b was killed"
    assert summary.ok, summary.error
    assert summary.restarts >= 1 and (summary.planned_steps, summary.completed_steps) == (10, 10)
    newest = f"step_{killer.killed_at_step:09d}"
    assert summary.resumed_from[0] == newest  # the newest valid bundle at the kill
    resumed_at, step = first_step_after(killer.killed_at)
    assert step["step"] == killer.killed_at_step + 1
    print(f"killed node -> first step after resume: {resumed_at - killer.killed_at:.1f} s")
    assert resumed_at - killer.killed_at <= 60
    expected, actual = final_weights(reference), final_weights(spec)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "weights differ after resume"


class ElasticScenario(threading.Thread):
    """Kills node_b once the 2-worker run has a bundle of step >= `after_step`, and starts it again
    once the run has gone on without it (a bundle written by 1 worker)."""

    def __init__(self, cluster: MultiNodeCluster, spec, after_step: int):
        super().__init__(daemon=True)
        self.cluster, self.spec, self.after_step = cluster, spec, after_step
        self.killed_at: float | None = None
        self.back_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            store, deadline = bundles(self.spec), time.time() + 600
            while self.back_at is None and time.time() < deadline:
                infos = store.list(verify=False)
                if self.killed_at is None and infos and infos[-1].step >= self.after_step:
                    self.cluster.kill_node("node_b")
                    self.killed_at = self.cluster.nodes["node_b"].killed_at
                elif self.killed_at is not None and any(i.meta.get("world_size") == 1 for i in infos):
                    self.cluster.start_node("node_b")
                    self.back_at = time.time()
                time.sleep(0.05)
        except BaseException as err:
            self.error = err


def test_elastic_run_shrinks_to_the_surviving_node_and_grows_back(
    multinode_cluster,  # noqa: F811
    tiny_llama,
    tmp_path,
):
    """cluster.num_workers: [1, 2]: with node_b SIGKILLed the run goes on on node_a alone, resumed
    from the 2-worker bundle (its micro-batch doubled, the global batch the same); when node_b is
    back it grows to 2 workers again, resumed from a 1-worker bundle; it ends at the planned step."""
    import ray

    cluster = multinode_cluster
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        spec = make_job(
            tiny_llama,
            tmp_path / "elastic",
            max_steps=STEPS,
            save_steps=2,
            cluster={"num_workers": [1, 2], "elastic_resize_interval_s": 2},
            checkpoint={"keep_last": STEPS},
            failure={"max_failures": 4},
        )
        scenario = ElasticScenario(cluster, spec, after_step=2)
        scenario.start()
        summary = run_training(spec, show_progress=False)
        scenario.join(timeout=120)
    finally:
        ray.shutdown()
    assert scenario.error is None, scenario.error
    assert scenario.back_at is not None, "the run ended before node_b came back"
    assert summary.ok, summary.error
    assert (summary.planned_steps, summary.completed_steps) == (STEPS, STEPS)
    sizes = [(info.step, info.meta["world_size"]) for info in bundles(spec).list(verify=False)]
    print("bundles (step, workers):", sizes)
    changes = [size for i, (_, size) in enumerate(sizes) if i == 0 or size != sizes[i - 1][1]]
    assert changes == [2, 1, 2], sizes
