"""Node loss on a real multi-node Ray cluster (tests/multinode.py): a head (0 CPUs: the driver,
Ray Train's controller, the progress queue) and two 1-CPU worker nodes, each its own raylet, so a
2-worker run has one worker per node. A whole worker node is SIGKILLed mid-run."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from clusterft.config import JobSpec
from clusterft.train.export import read_metrics
from clusterft.train.launcher import (
    ELASTIC_START_TIMEOUT_S,
    START_TIMEOUT_ENV,
    RunSummary,
    locate,
    run_training,
)
from tests.multinode import HEAD, NODE_DEATH, MultiNodeCluster
from tests.train.helpers import bundles, final_weights, make_job

pytestmark = pytest.mark.slow
CLOCK = "tests.train.test_node_loss.StepClock"


@pytest.fixture(scope="module")
def cluster() -> Iterator[MultiNodeCluster]:
    """One cluster for the module (starting three nodes takes a minute here); each test leaves
    every node running."""
    with MultiNodeCluster(worker_nodes={"node_a": 1, "node_b": 1}, env=NODE_DEATH) as started:
        yield started


@contextlib.contextmanager
def driver(cluster: MultiNodeCluster) -> Iterator[None]:
    """This process as a driver of the cluster (on the head node), and the whole cluster up."""
    import ray

    cluster.wait_alive()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


class StepClock:
    """A user callback (named by dotted path) stamping each step the driver hears of."""

    steps: ClassVar[list[tuple[float, dict]]] = []
    start_timeouts: ClassVar[set[str | None]] = set()  # Ray Train's worker-group start timeout env

    def on_step_end(self, metrics: dict) -> None:
        self.steps.append((time.time(), metrics))
        self.start_timeouts.add(os.environ.get(START_TIMEOUT_ENV))


def first_step_after(moment: float, attempt_after: int = 1) -> tuple[float, dict]:
    """(when, record) of the first step heard after `moment` by an attempt later than `attempt_after`."""
    return next((at, rec) for at, rec in StepClock.steps if at > moment and rec["attempt"] > attempt_after)


class Scenario(threading.Thread):
    """Acts on the cluster while a run trains: each `(condition, action)` waits until
    `condition(bundles)` holds for the run's published bundles, then runs `action()` and stamps it."""

    def __init__(self, spec: JobSpec, moves: list[tuple[Callable[[list], bool], Callable[[], None]]]):
        super().__init__(daemon=True)
        self.spec, self.moves = spec, moves
        self.done_at: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            store, deadline = bundles(self.spec), time.time() + 600
            for condition, action in self.moves:
                while not condition(store.list(verify=False)):
                    assert time.time() < deadline, f"move {len(self.done_at)} never came"
                    time.sleep(0.02)
                action()
                self.done_at.append(time.time())
        except BaseException as err:  # reported by the test, not lost in the thread
            self.error = err


def train_through(spec: JobSpec, scenario: Scenario) -> RunSummary:
    StepClock.steps.clear()
    StepClock.start_timeouts.clear()
    scenario.start()
    summary = run_training(spec, show_progress=False)
    scenario.join(timeout=180)
    assert scenario.error is None, scenario.error
    assert len(scenario.done_at) == len(scenario.moves), "the run ended before the scenario did"
    return summary


def loss_curve(spec: JobSpec) -> dict[int, float]:
    """step -> loss as the run ended with it (metrics.jsonl; a resumed attempt's re-trained steps win)."""
    records = read_metrics(Path(spec.train.output_dir) / "metrics.jsonl")
    return {step: record["loss"] for step, record in records.items()}


def watch_death(cluster: MultiNodeCluster, node_id: str, stamps: list[float]) -> None:
    """Stamp when the GCS stops listing node `node_id` alive (its health checks failed), in a thread."""

    def watch() -> None:
        while node_id in cluster.live_node_ids():
            time.sleep(0.1)
        stamps.append(time.time())

    threading.Thread(target=watch, daemon=True).start()


def setup_started(spec: JobSpec, after: float) -> float | None:
    """When the first worker of a group started after `after` began its setup (it writes its pid file
    first thing)."""
    pid_files = (Path(spec.train.output_dir) / ".clusterft" / "workers").glob("rank-*.pid")
    times = [t for f in pid_files if (t := f.stat().st_mtime) > after]
    return min(times) if times else None


def killed_at(cluster: MultiNodeCluster, node: str) -> Callable[[], None]:
    return lambda: cluster.kill_node(node)


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def back_while_throttled(
    cluster: MultiNodeCluster, node: str, spec: JobSpec, back_at: list[float], timeout_s: float = 150
) -> Callable[[], None]:
    """Restarts `node` with the run's lone worker throttled (SIGSTOP, and SIGCONT for 50 ms of every
    500 ms) until Ray Train's resize shuts that worker down. Ray's autoscaling coordinator sees a
    new node only on its 20 s tick (`_AutoscalingCoordinatorActor.TICK_INTERVAL_S`) and a node start
    takes 10-40 s here, so a worker at full speed can finish the whole run first and the grow-back
    never comes (it did so in CI). Throttled, not stopped: it must still answer Ray's health checks
    and shut its process group down when the resize comes (stopped, that waited out a 30 s timeout).
    Stamps `back_at` when the GCS lists the node alive again."""

    def act() -> None:
        pid = int((locate(spec).run_dir / "workers" / "rank-0.pid").read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            cluster.start_node(node)
            back_at.append(time.time())
            deadline = time.time() + timeout_s
            while running(pid) and time.time() < deadline:
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.05)
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.45)
        except ProcessLookupError:
            pass  # shut down by the resize between the check and the signal
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    return act


def test_kill_node_kills_exactly_that_node_and_it_comes_back(cluster):
    """The helper's contract: an actor pinned to node_a dies with node_a (raylet and workers
    SIGKILLed), node_b's actor lives on, the GCS marks node_a dead, and a restarted node_a
    takes work again under the same label."""
    import ray

    with driver(cluster):

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
        ray.kill(on_b)
        ray.kill(again)


def test_killed_node_resumes_from_newest_bundle_bitwise(cluster, tiny_llama, tmp_path):
    """2 workers, one per worker node; node_b (raylet and workers) is SIGKILLed after the step-2
    bundle and rebooted: the run resumes from its newest valid bundle on 2 workers and ends with
    the planned steps and the uninterrupted run's weights, bit for bit."""
    job = {"max_steps": 10, "save_steps": 2, "callbacks": [CLOCK]}
    reference = make_job(tiny_llama, tmp_path / "reference", **job)
    spec = make_job(tiny_llama, tmp_path / "killed", **job)
    newest: list[int] = []
    dead_at: list[float] = []

    def kill() -> None:
        [node_id] = [i for i, name in cluster.live_node_ids().items() if name == "node_b"]
        cluster.kill_node("node_b")
        watch_death(cluster, node_id, dead_at)
        newest.append(bundles(spec).find_latest_valid().step)  # nothing writes bundles now

    scenario = Scenario(
        spec,
        [
            (lambda infos: bool(infos) and infos[-1].step >= 2, kill),
            (lambda infos: True, lambda: cluster.start_node("node_b")),
        ],
    )
    with driver(cluster):
        assert run_training(reference, show_progress=False).ok
        summary = train_through(spec, scenario)
    assert summary.ok, summary.error
    assert summary.restarts >= 1 and (summary.planned_steps, summary.completed_steps) == (10, 10)
    assert summary.resumed_from[0] == f"step_{newest[0]:09d}"  # the newest valid bundle at the kill
    kill_time = cluster.nodes["node_b"].killed_at
    resumed_at, record = first_step_after(kill_time)
    assert record["step"] == newest[0] + 1
    setup_at = setup_started(spec, kill_time)
    print(
        f"\nkilled node -> GCS marks it dead {dead_at[0] - kill_time:.1f} s, node back "
        f"{scenario.done_at[1] - kill_time:.1f} s, new workers' setup begins "
        f"{setup_at - kill_time:.1f} s, first step after resume {resumed_at - kill_time:.1f} s"
    )
    # The target is 60 s (issue 13). With the GCS's 10 x 1 s health checks (NODE_DEATH; Ray's default
    # 5 x 3 s took ~15-20 s) this 2-core machine measured 44.7 s and 44.4 s at load averages of 20 and
    # 40: ~10 s until the GCS marks the node dead, ~16 s until Ray Train's new workers begin their
    # setup, ~18 s of setup (imports, process group, bundle, model, DeepSpeed) to the first step.
    # 75 s leaves room for a busier machine and still fails a restart that waits out one of Ray's
    # 60 s timeouts (a dead actor's death info, a worker group's start).
    assert resumed_at - kill_time <= 75
    expected, actual = final_weights(reference), final_weights(spec)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "weights differ after resume"


STEPS = 40


def test_elastic_run_shrinks_to_the_surviving_node_and_grows_back(cluster, tiny_llama, tmp_path):
    """cluster.num_workers: [1, 2]: with node_b SIGKILLed the run goes on on node_a alone, resumed
    from the 2-worker bundle (its micro-batch doubled, the global batch the same); when node_b is
    back it grows to 2 workers again, resumed from a 1-worker bundle; it ends at the planned step,
    on the fixed 2-worker run's loss curve (no dropout here, so only summation order differs)."""
    job = {
        "max_steps": STEPS,
        "save_steps": 2,
        "lora_dropout": 0.0,
        "checkpoint": {"keep_last": STEPS},
        "callbacks": [CLOCK],
    }
    reference = make_job(tiny_llama, tmp_path / "fixed", **job)
    spec = make_job(
        tiny_llama,
        tmp_path / "elastic",
        cluster={"num_workers": [1, 2], "elastic_resize_interval_s": 2},
        failure={"max_failures": 4},
        **job,
    )
    back_at: list[float] = []
    scenario = Scenario(
        spec,
        [
            (lambda infos: bool(infos) and infos[-1].step >= 2, killed_at(cluster, "node_b")),
            (
                lambda infos: any(i.meta.get("world_size") == 1 for i in infos),
                back_while_throttled(cluster, "node_b", spec, back_at),
            ),
        ],
    )
    with driver(cluster):
        assert run_training(reference, show_progress=False).ok
        summary = train_through(spec, scenario)
    assert summary.ok, summary.error
    assert (summary.planned_steps, summary.completed_steps) == (STEPS, STEPS)
    # Ray Train's controller waited ELASTIC_START_TIMEOUT_S, not its 60 s, for the old size's
    # resources that Ray's stale view of the cluster promised; the run leaves the env as it was.
    assert StepClock.start_timeouts == {ELASTIC_START_TIMEOUT_S} and START_TIMEOUT_ENV not in os.environ
    sizes = [(info.step, info.meta["world_size"]) for info in bundles(spec).list(verify=False)]
    changes = [size for i, (_, size) in enumerate(sizes) if i == 0 or size != sizes[i - 1][1]]
    assert changes == [2, 1, 2], sizes

    kill_time, back_time = cluster.nodes["node_b"].killed_at, back_at[0]
    shrunk_at, shrunk = first_step_after(kill_time)
    grown_at, grown = first_step_after(back_time, attempt_after=shrunk["attempt"])
    print(
        f"\nelastic: killed node -> first step on 1 worker {shrunk_at - kill_time:.1f} s (step "
        f"{shrunk['step']}); node back -> first step on 2 workers {grown_at - back_time:.1f} s "
        f"(step {grown['step']})"
    )
    # Same data and global batches as the fixed run, so only the order of fp32 sums differs once the
    # run is on 1 worker. That difference grows by itself: a fixed 1-worker and a fixed 2-worker run
    # of this job, nothing resized, are 1.4e-7 apart (relative) over their first 12 steps and 6.2e-2
    # at worst over 200 (measured; 200-step elastic runs ended 6.1e-2 and 7.4e-2 apart, a 40-step one
    # 3.4e-7). So the whole curve can only be printed; the two steps right after the 2 -> 1 resume
    # are checked instead: their weights came from the bundle; a lost moment or step count would
    # move the second by ~lr.
    losses, expected = loss_curve(spec), loss_curve(reference)
    assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1))
    first_on_one = min(step for step, size in sizes if size == 1)
    resumed_from = max(step for step, size in sizes if size == 2 and step < first_on_one)
    for step in (resumed_from + 1, resumed_from + 2):  # the restored weights, then one update on them
        gap = abs(losses[step] - expected[step]) / expected[step]
        assert gap < 1e-4, (step, losses[step], expected[step])
    worst = max(abs(losses[s] - expected[s]) / expected[s] for s in losses)
    print(f"elastic vs fixed 2-worker run: largest relative loss difference {worst:.2e}")
