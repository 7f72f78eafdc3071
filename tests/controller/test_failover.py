"""Controller failover across nodes, on a real multi-node Ray cluster on this machine
(tests/multinode.py): the controller actor runs on a node of its own (ctl_a, or ctl_b), training on
node train, the drivers are Ray jobs of the head's job server. The controller's node is SIGKILLed
mid-training (raylet and every process):
Ray restarts the detached actor on another node, the new controller takes the job's lease over from
its dead predecessor, finds the driver through the job server by its submission id and re-attaches
to it (no second trainer, no relaunch), and the job finishes with the uninterrupted run's weights,
bit for bit."""

from __future__ import annotations

import time

import pytest
import torch

from clusterft.config import JobSpec
from clusterft.controller.actor import CONTROLLER_NAME, NAMESPACE, get_or_start_controller
from clusterft.controller.jobs import Jobs
from clusterft.controller.ray_jobs import RayJobs, pointer, submission_id
from clusterft.controller.state import JobState
from clusterft.train.launcher import run_training
from tests.multinode import NODE_DEATH, MultiNodeCluster
from tests.train.helpers import bundles, final_weights, make_job

pytestmark = pytest.mark.slow
SETTLED = {JobState.REGISTERED, JobState.PROMOTED, JobState.SERVING, JobState.ERROR, JobState.CANCELLED}
CONTROLLER_NODES = ("ctl_a", "ctl_b")
STEPS = 60


def node_names() -> dict[str, str]:
    """Node id -> its name in the cluster (its label resource; "head" for the head)."""
    import ray

    names = {}
    for node in ray.nodes():
        if node["Alive"]:
            labels = [r for r in node["Resources"] if r in (*CONTROLLER_NODES, "train")]
            names[node["NodeID"]] = labels[0] if labels else "head"
    return names


def controller_exists() -> bool:
    import ray

    try:
        ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def controlled_job(steps: int) -> dict:
    """The spec sections of a job the controller carries: `steps` steps, a bundle every 4, no
    evaluation, promoted on success, relaunched after a failure (twice at most)."""
    return {
        "max_steps": steps,
        "save_steps": 4,
        "eval": {"enabled": False},
        "promote": {"model_name": "tiny", "auto": True},
        "failure": {"max_job_restarts": 2, "backoff_s": 0.2},
    }


def assert_same_weights(reference: JobSpec, spec: JobSpec) -> None:
    """The final weights of `spec`'s run equal those of the uninterrupted `reference`, bit for bit."""
    expected, actual = final_weights(reference), final_weights(spec)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), (
        "weights differ from the uninterrupted run"
    )


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} after {timeout_s} s"
        time.sleep(every_s)
    return value


def test_killing_the_controllers_node_mid_job_reattaches_to_the_running_driver(tiny_llama, tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {"ctl_a": 0, "ctl_b": 0, "train": 2}
    root, registry = tmp_path / "controller", tmp_path / "registry"
    # Long enough that the driver usually outlives the controller's takeover (~15 s here), so the live
    # re-attach is what runs; a driver that ends first is read through the job server.
    sections = controlled_job(STEPS)
    with MultiNodeCluster(worker_nodes=nodes, env=NODE_DEATH) as cluster:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        try:
            reference = make_job(tiny_llama, tmp_path / "reference", **sections)
            assert run_training(reference, show_progress=False).ok

            cluster.wait_alive()
            ctl_a = {name: node for node, name in node_names().items()}["ctl_a"]
            for _ in range(5):
                actor = get_or_start_controller(
                    root,
                    registry,
                    poll_s=0.2,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(ctl_a, soft=True),
                )
                before = ray.get(actor.info.remote())
                where = node_names()[before["node_id"]]
                if where in CONTROLLER_NODES:
                    break
                # Soft affinity falls back to any node when the GCS finds ctl_a unavailable (seen on
                # a loaded machine: the head); the head cannot be killed, so start it again.
                ray.kill(actor, no_restart=True)
                wait_for("the misplaced controller's name freed", lambda: not controller_exists(), 30)
            assert where in CONTROLLER_NODES and before["job_server"] == cluster.dashboard_url
            jobs = Jobs(root, registry, controller=actor)
            spec = make_job(tiny_llama, tmp_path / "killed", **sections)
            job_id = jobs.submit(spec).id
            train = submission_id(job_id, 1, "train")
            wait_for(
                "no bundle of step 4", lambda: (b := bundles(spec).find_latest_valid()) and b.step >= 4, 240
            )
            assert ray.get(actor.info.remote())["runs"] == {job_id: f"Ray job {train}"}

            cluster.kill_node(where)
            killed = time.monotonic()

            def back() -> dict | None:
                """The new controller's info once it watches the driver again, or, where the driver
                ended while no controller was alive (a loaded machine's slow takeover can let it), once it
                has read how it ended and moved the job on: either way, never a second driver."""
                info = ray.get(actor.info.remote(), timeout=120)
                if info["node_id"] == before["node_id"]:
                    return None
                if info["runs"].get(job_id) or jobs.get(job_id).status is not JobState.TRAINING:
                    return info
                return None

            after = wait_for("the controller did not come back and take the job over", back, 180)
            takeover_s = time.monotonic() - killed
            attached = bool(after["runs"].get(job_id))
            print(
                f"controller node killed -> controller back on another node, "
                f"{'re-attached to the live driver' if attached else 'read the ended driver'}: "
                f"{takeover_s:.1f} s"
            )
            assert after["pid"] != before["pid"]
            assert after["runs"] in ({job_id: f"Ray job {train}"}, {})

            job = wait_for("the job did not settle", lambda: (j := jobs.get(job_id)).settled and j, 300, 0.5)
            assert job.status is JobState.PROMOTED, job.reason
            assert (job.attempt, job.restarts) == (1, 0)  # never relaunched
            assert job.result["train"]["completed_steps"] == STEPS
            [log] = jobs.store.logs(job_id)
            assert (log.kind, log.path) == ("train", pointer(train))
            [(where, text)] = jobs.log_texts(job_id)  # through the job server
            assert where == pointer(train) and f"train driver of job {job_id}" in text
            submitted = [j.submission_id for j in RayJobs(cluster.dashboard_url)._client.list_jobs()]
            assert [s for s in submitted if s and job_id in s] == [train]  # one driver, ever
            jobs.close()
        finally:
            ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE), no_restart=True)
            ray.shutdown()
    assert_same_weights(reference, spec)
