"""Job store benchmark: submissions and state moves per second with several processes writing at
once, on SQLite (the embedded default: WAL, a local disk) and on PostgreSQL (a real server started by
pgserver on this host, over its Unix socket, fsync on).

Each process opens its own store and, N times: submits a job (with its run folders, as `Jobs.submit`
does: checked against every unsettled job's) and moves it submitted -> training (a compare-and-set).
Operations per second = 2N x processes / the wall time from the common start to the last finish.

Then each process is a controller (its store fenced by its id) working its share of N new jobs per
process as a controller's ticks do: claim the job's lease, move it (fenced), point at its log, renew
the lease: 4 operations a job (`controllers.ops_per_s`). Last, the controllers race for the same
jobs: each claims every job and tries to move it; only the lease holder's fenced move goes through
(checked: every job moved exactly once, by its holder).

    python bench/store.py --json                 # prints one JSON object
    python bench/store.py --processes 8 --jobs 100
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import result_stream  # noqa: E402


def job_spec():
    from clusterft.config import parse_job_dict

    raw = {"model_name_or_path": "models/tiny-llama", "dataset": "demo_tasks", "output_dir": "saves/bench"}
    return parse_job_dict({**raw, "max_steps": 10}, "bench.yaml")


def submit_and_move(location: str, worker: int, jobs: int, barrier: Any, results: Any) -> None:
    from clusterft.controller.state import JobState, Training
    from clusterft.controller.store import JobStore

    spec = job_spec()
    with JobStore(location) as store:
        submit_s, move_s = [], []
        barrier.wait()
        start = time.perf_counter()
        for n in range(jobs):
            run = f"{worker}-{n}"
            folders = {"train.output_dir": f"/runs/{run}", "checkpoint.storage_path/name": f"/ckpt/{run}"}
            t0 = time.perf_counter()
            job = store.submit(spec, folders=folders)
            t1 = time.perf_counter()
            store.transition(job.id, JobState.SUBMITTED, Training())
            submit_s.append(t1 - t0)
            move_s.append(time.perf_counter() - t1)
        results.put((start, time.perf_counter(), submit_s, move_s))


LEASE_S = 15.0  # the controller's default


def controller(location: str, worker: int, job_ids: list[str], barrier: Any, results: Any) -> None:
    """A controller's store work on its jobs: claim, fenced move, log pointer, renewal."""
    from clusterft.controller.state import JobState, Training
    from clusterft.controller.store import JobStore

    holder = f"bench-controller-{worker}"
    with JobStore(location, fence=holder) as store:
        barrier.wait()
        start = time.perf_counter()
        for job_id in job_ids:
            assert store.claim(job_id, holder, "bench", worker, LEASE_S).holder == holder
            store.transition(job_id, JobState.SUBMITTED, Training())
            store.add_log(job_id, "train", f"/runs/{job_id}/train.log")
            store.claim(job_id, holder, "bench", worker, LEASE_S)  # the next tick renews it
        results.put((start, time.perf_counter(), 4 * len(job_ids)))


def race(location: str, worker: int, job_ids: list[str], barrier: Any, results: Any) -> None:
    """Every controller claims every job and tries to move it: only the holder's move is written."""
    from clusterft.controller.state import JobState, Training
    from clusterft.controller.store import JobStore, LeaseLost, StaleState

    holder = f"bench-racer-{worker}"
    with JobStore(location, fence=holder) as store:
        won = 0
        barrier.wait()
        start = time.perf_counter()
        for job_id in job_ids:
            held = store.claim(job_id, holder, "bench", worker, LEASE_S).holder == holder
            try:
                store.transition(job_id, JobState.SUBMITTED, Training())
                assert held, f"{holder} moved {job_id} without its lease"
                won += 1
            except (LeaseLost, StaleState):
                pass
        results.put((start, time.perf_counter(), won))


def run(target, args_of, processes: int) -> list[Any]:
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=target, args=(*args_of(i), barrier, results)) for i in range(processes)]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    return got


def bench_backend(location: str, processes: int, jobs: int) -> dict[str, Any]:
    from clusterft.controller.state import JobState
    from clusterft.controller.store import JobStore

    with JobStore(location):
        pass  # create the schema before the clock starts
    got = run(submit_and_move, lambda i: (location, i, jobs), processes)
    wall = max(end for _, end, _, _ in got) - min(start for start, _, _, _ in got)
    submits = [s for _, _, sub, _ in got for s in sub]
    moves = [s for _, _, _, mov in got for s in mov]

    with JobStore(location) as store:
        spec = job_spec()
        owned = [[store.submit(spec).id for _ in range(jobs)] for _ in range(processes)]
        contested = [store.submit(spec).id for _ in range(jobs)]
    ticked = run(controller, lambda i: (location, i, owned[i]), processes)
    tick_wall = max(end for _, end, _ in ticked) - min(start for start, _, _ in ticked)
    raced = run(race, lambda i: (location, i, contested), processes)
    race_wall = max(end for _, end, _ in raced) - min(start for start, _, _ in raced)
    with JobStore(location) as store:
        assert sum(won for _, _, won in raced) == len(contested), "a job moved twice, or not at all"
        assert all(store.get(job_id).status is JobState.TRAINING for job_id in contested)

    def ms(values: list[float], q: float) -> float:
        return round(statistics.quantiles(values, n=100)[int(q) - 1] * 1000, 2)

    return {
        "ops_per_s": round(2 * len(submits) / wall, 1),
        "submit_ms": {"p50": ms(submits, 50), "p99": ms(submits, 99)},
        "transition_ms": {"p50": ms(moves, 50), "p99": ms(moves, 99)},
        "controllers": {
            "ops_per_s": round(sum(ops for _, _, ops in ticked) / tick_wall, 1),
            "per_job": "claim, fenced move, log pointer, lease renewal",
        },
        "race": {"jobs": len(contested), "attempts_per_s": round(processes * len(contested) / race_wall, 1)},
    }


def main(argv: list[str]) -> int:
    out = result_stream(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=200, help="jobs each process submits and moves")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)

    import pgserver
    import psycopg

    result: dict[str, Any] = {
        "processes": args.processes,
        "jobs_per_process": args.jobs,
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores",
    }
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        result["sqlite"] = bench_backend(str(Path(tmp) / "jobs.db"), args.processes, args.jobs)
        server = pgserver.get_server(Path(tmp) / "postgres", cleanup_mode="delete")
        try:
            with psycopg.connect(server.get_uri()) as db:
                version = db.execute("SHOW server_version").fetchone()[0]
                fsync = db.execute("SHOW fsync").fetchone()[0]
            result["postgresql"] = bench_backend(server.get_uri(), args.processes, args.jobs)
            result["postgresql"]["server"] = f"PostgreSQL {version} (pgserver), Unix socket, fsync {fsync}"
        finally:
            server.cleanup()
    print(json.dumps(result, indent=None if args.json else 2), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
