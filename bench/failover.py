"""Controller failover benchmark: a 20-iteration kill loop on a real multi-node Ray cluster on this
machine (tests/multinode.py: a head with the job server, nodes ctl_a and ctl_b with no CPUs for the
controller actor, node train with 2 CPUs for the workers).

One long tiny LoRA job trains (its driver a Ray job of the head's job server) while the loop kills
the controller, `--iterations` times: the whole node the actor runs on (raylet, agents, workers,
SIGKILL; then the node is started again), or, when Ray restarted the actor on a node the loop must
not kill (the head, the training node), the actor's process alone. Each iteration measures the
takeover: from the kill until the restarted controller answers with the job's driver re-attached.
At the end the job's attempts and the Ray jobs submitted for it say how many times it was relaunched
(must be 0): `relaunched` counts attempts beyond the first and submissions beyond one per attempt.

    python bench/failover.py --json                 # one JSON object (minutes: 20 node restarts)
    python bench/failover.py --iterations 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import result_stream  # noqa: E402
from tests.controller.test_failover import CONTROLLER_NODES, NODE_DEATH, node_names, wait_for  # noqa: E402


def reattached(actor: Any, job_id: str, before_pid: int) -> dict[str, Any] | None:
    """The restarted controller's info once it watches the job's driver again."""
    import ray

    try:
        info = ray.get(actor.info.remote(), timeout=5)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return None
    return info if info["pid"] != before_pid and job_id in info["runs"] else None


def kill_loop(iterations: int, max_steps: int, work: Path) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from clusterft.controller.actor import CONTROLLER_NAME, NAMESPACE, get_or_start_controller
    from clusterft.controller.jobs import Jobs
    from clusterft.controller.ray_jobs import RayJobs
    from clusterft.controller.state import JobState
    from clusterft.hf.tiny import make_tiny_model
    from tests.multinode import MultiNodeCluster
    from tests.train.helpers import make_job

    model = make_tiny_model(work / "tiny-llama", "llama", "tiny")
    nodes = {"ctl_a": 0, "ctl_b": 0, "train": 2}
    takeovers: list[dict[str, Any]] = []
    with MultiNodeCluster(worker_nodes=nodes, env=NODE_DEATH) as cluster:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        try:
            cluster.wait_alive()
            ids = {name: node for node, name in node_names().items()}
            on_ctl_a = NodeAffinitySchedulingStrategy(ids["ctl_a"], soft=True)
            root = work / "controller"
            actor = get_or_start_controller(root, work / "registry", poll_s=0.2, scheduling_strategy=on_ctl_a)
            jobs = Jobs(root, work / "registry", controller=actor)
            spec = make_job(model, work / "out", max_steps=max_steps, save_steps=10, eval={"enabled": False})
            job_id = jobs.submit(spec).id
            info = wait_for("no driver", lambda: reattached(actor, job_id, -1), 300)
            for n in range(iterations):
                if jobs.get(job_id).status is not JobState.TRAINING:
                    raise RuntimeError(f"the job left training at iteration {n}: {jobs.get(job_id)}")
                where = node_names().get(info["node_id"], "?")
                killed = time.monotonic()
                if where in CONTROLLER_NODES:
                    cluster.kill_node(where)
                    killed = time.monotonic()
                else:  # Ray put the actor where the loop must not kill a node: kill its process
                    os.kill(info["pid"], signal.SIGKILL)
                after = wait_for("no takeover", lambda p=info["pid"]: reattached(actor, job_id, p), 300)
                takeover_s = time.monotonic() - killed
                takeovers.append({"killed": "node" if where in CONTROLLER_NODES else "process",
                                  "on": where, "takeover_s": round(takeover_s, 2)})  # fmt: skip
                print(json.dumps({"iteration": n, **takeovers[-1]}), file=sys.stderr, flush=True)
                if where in CONTROLLER_NODES:
                    cluster.start_node(where)
                info = after
            job = jobs.get(job_id)
            submitted = [j.submission_id for j in RayJobs(cluster.dashboard_url)._client.list_jobs()]
            mine = [s for s in submitted if s and job_id in s]
            jobs.cancel(job_id)
            wait_for("the driver was not stopped", lambda: not reattached(actor, job_id, -1), 60)
            jobs.close()
        finally:
            try:
                ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE), no_restart=True)
            finally:
                ray.shutdown()
    times = [t["takeover_s"] for t in takeovers]
    return {
        "iterations": iterations,
        "node_kills": sum(t["killed"] == "node" for t in takeovers),
        "process_kills": sum(t["killed"] == "process" for t in takeovers),
        "takeover_s": {"p50": statistics.median(times), "max": max(times), "min": min(times)},
        "attempts": job.attempt,
        "driver_submissions": len(mine),
        "relaunched": (job.attempt - 1) + (len(mine) - job.attempt),
        "each": takeovers,
    }


def main(argv: list[str]) -> int:
    out = result_stream(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=5000, help="long enough to outlast the loop")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    from clusterft.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        result = kill_loop(args.iterations, args.max_steps, Path(tmp))
    print(json.dumps(result, indent=None if args.json else 2), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
