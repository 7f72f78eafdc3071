"""Losing the node that hosts a job's driver, on a real multi-node Ray cluster on this machine
(tests/multinode.py): the controller runs on the head, the training workers on node train, and the
drivers (Ray jobs) on drv_a or drv_b, the two nodes holding the `driver` resource the controller
asks for (`driver_resources`). The driver's node is SIGKILLed mid-training (raylet, job supervisor,
entrypoint and every other process of it): the job server reports the Ray job FAILED, the controller
counts a failed attempt and launches the next on the surviving driver node, which resumes from the
newest valid checkpoint (step > 0), and the job ends with the uninterrupted run's weights, bit for
bit."""

from __future__ import annotations

import re
import time

import pytest

from clusterft.controller.actor import CONTROLLER_NAME, NAMESPACE, get_or_start_controller
from clusterft.controller.jobs import Jobs
from clusterft.controller.ray_jobs import DRIVER_RESOURCES_ENV, RayJobs, parse_driver_resources, submission_id
from clusterft.controller.state import JobState
from clusterft.errors import UserError
from clusterft.train.launcher import run_training
from tests.controller.test_failover import assert_same_weights, controlled_job, wait_for
from tests.multinode import HEAD, NODE_DEATH, MultiNodeCluster
from tests.train.helpers import bundles, make_job

DRIVER_NODES = ("drv_a", "drv_b")
STEPS = 24  # attempt 1 outlives the kill after its step-4 bundle; fewer keep the test short


def node_name(node_id: str) -> str:
    """A live node's name in the cluster: its label resource, or "head"."""
    import ray

    [node] = [n for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]]
    labels = [r for r in node["Resources"] if r in (*DRIVER_NODES, "train")]
    return labels[0] if labels else HEAD


def driver_node(server: RayJobs, submission: str) -> str | None:
    """The node whose entrypoint process runs the Ray job's driver, once it started."""
    node_id = server._client.get_job_info(submission).driver_node_id
    return node_name(node_id) if node_id else None


@pytest.mark.parametrize(
    ("text", "parsed"), [("", {}), (' {"driver": 0.01, "gpu_host": 1} ', {"driver": 0.01, "gpu_host": 1.0})]
)
def test_driver_resources_parse_from_json(text, parsed):
    assert parse_driver_resources(text) == parsed


@pytest.mark.parametrize("text", ["driver", "[1]", '{"driver": 0}', '{"driver": "1"}', '{"driver": true}'])
def test_bad_driver_resources_are_refused_naming_the_variable_and_the_form(text):
    with pytest.raises(UserError, match=DRIVER_RESOURCES_ENV) as refused:
        parse_driver_resources(text)
    assert "clusterft_driver" in str(refused.value) and repr(text) in str(refused.value)


@pytest.mark.slow
def test_killing_the_drivers_node_resumes_the_job_from_its_newest_checkpoint_on_another_node(
    tiny_llama, tmp_path
):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {"drv_a": 0, "drv_b": 0, "train": 2}
    labels = {name: {"driver": 1} for name in DRIVER_NODES}
    root, registry = tmp_path / "controller", tmp_path / "registry"
    sections = controlled_job(STEPS)
    with MultiNodeCluster(worker_nodes=nodes, env=NODE_DEATH, resources=labels) as cluster:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        try:
            reference = make_job(tiny_llama, tmp_path / "reference", **sections)
            assert run_training(reference, show_progress=False).ok

            cluster.wait_alive()
            head = ray.get_runtime_context().get_node_id()  # this test's driver runs on the head
            actor = get_or_start_controller(
                root,
                registry,
                poll_s=0.2,
                scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
                driver_resources={"driver": 0.01},
            )
            info = ray.get(actor.info.remote())
            assert info["job_server"] == cluster.dashboard_url
            assert info["driver_resources"] == {"driver": 0.01}
            server = RayJobs(cluster.dashboard_url)
            jobs = Jobs(root, registry, controller=actor)
            spec = make_job(tiny_llama, tmp_path / "killed", **sections)
            job_id = jobs.submit(spec).id
            first, second = (submission_id(job_id, attempt, "train") for attempt in (1, 2))
            wait_for(
                "no bundle of step 4", lambda: (b := bundles(spec).find_latest_valid()) and b.step >= 4, 240
            )
            killed_node = driver_node(server, first)
            assert killed_node in DRIVER_NODES, f"the driver runs on {killed_node}, not a driver node"
            assert jobs.get(job_id).status is JobState.TRAINING

            cluster.kill_node(killed_node)
            killed = time.monotonic()
            ended = wait_for(
                "attempt 1 still alive", lambda: (s := server.state(first)) and not s.alive and s, 120
            )
            failed_s = time.monotonic() - killed
            wait_for("attempt 2 not submitted", lambda: server.state(second), 120)
            relaunched_s = time.monotonic() - killed
            why = ended.ended.splitlines()[0]
            print(
                f"driver node {killed_node} killed -> Ray job FAILED after {failed_s:.1f} s ({why}), "
                f"attempt 2 submitted after {relaunched_s:.1f} s"
            )
            assert "supervisor" in ended.ended.lower() or "died" in ended.ended.lower(), ended.ended

            job = wait_for("the job did not settle", lambda: (j := jobs.get(job_id)).settled and j, 300, 0.5)
            print(f"killed -> job {job.status.value} after {time.monotonic() - killed:.1f} s")
            assert job.status is JobState.PROMOTED, job.reason
            assert (job.attempt, job.restarts) == (2, 1)
            assert job.result["train"]["completed_steps"] == STEPS
            [survivor] = set(DRIVER_NODES) - {killed_node}
            assert driver_node(server, second) == survivor
            # Attempt 2 started from a checkpoint of attempt 1, not from zero.
            resumed = re.search(r"step_(\d{9})", job.resumed_from or "")
            assert resumed and int(resumed.group(1)) >= 4, job.resumed_from
            failure = [e for e in jobs.store.events(job_id) if e.to_state is JobState.FAILED]
            assert len(failure) == 1 and failure[0].attempt == 1
            submitted = sorted(
                j.submission_id for j in server._client.list_jobs() if job_id in (j.submission_id or "")
            )
            assert submitted == [first, second]
            jobs.close()
        finally:
            ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE), no_restart=True)
            ray.shutdown()
    assert_same_weights(reference, spec)
