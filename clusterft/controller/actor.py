"""The controller's process: a detached, named Ray actor (`JobControllerActor`) that ticks a
`Controller` in a background thread (`supervise`), and how a client finds it or starts it
(`get_or_start_controller`, `connect_controller`).

Ray is imported only inside the actor and these functions: the controller itself, and `supervise`,
are testable without a cluster. A tick that fails as a whole (the store locked or unreadable) is
retried after a backoff; after too many in a row the actor's process ends and Ray restarts it
(`max_restarts=-1`), re-reading the store, the run files and the registry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from clusterft.controller.controller import Controller
from clusterft.controller.policy import (
    TICK_FAILURES,
    RestartController,
    TickFailurePolicy,
    decide_after_tick_failure,
)
from clusterft.controller.ray_jobs import DRIVER_RESOURCES_ENV, cluster_job_server, parse_driver_resources
from clusterft.controller.store_backend import describe, store_location
from clusterft.errors import UserError

logger = logging.getLogger(__name__)
CONTROLLER_NAME = "clusterft-controller"
NAMESPACE = "clusterft"


def supervise(
    controller: Controller,
    wake: threading.Event,
    poll_s: float,
    policy: TickFailurePolicy = TICK_FAILURES,
    *,
    stop: threading.Event | None = None,
) -> RestartController | None:
    """Tick `controller` every `poll_s` (at once when `wake` is set) until `stop` is set (None), or
    until `policy` says the failed ticks in a row are enough (its decision). A tick that fails as a
    whole (the store locked, unreadable, its disk full) is logged and retried after a doubling
    backoff: it never ends the loop silently while the actor looks alive."""
    stop = stop or threading.Event()
    failures = 0
    while not stop.is_set():
        try:
            controller.tick()
            failures, wait_s = 0, poll_s
        except Exception as err:
            failures += 1
            error = f"{type(err).__name__}: {err}"
            decision = decide_after_tick_failure(failures, error, policy)
            if isinstance(decision, RestartController):
                logger.critical("controller: %s", decision.reason, exc_info=True)
                return decision
            logger.error(
                "controller: tick failed (%d in a row): %s; next try in %gs",
                failures,
                error,
                decision.after_s,
                exc_info=True,
            )
            wait_s = decision.after_s
        wake.wait(wait_s)
        wake.clear()
    return None


class JobControllerActor:
    """The detached actor: builds a `Controller` and ticks it in a background thread. Ray restarts
    it after a crash or `ray.kill(..., no_restart=False)`; __init__ runs again and resumes."""

    def __init__(
        self,
        root: str,
        registry_root: str,
        poll_s: float = 0.5,
        store_url: str | None = None,
        driver_resources: dict[str, float] | None = None,
    ):
        import ray

        from clusterft.runtime import apply_runtime_defaults

        apply_runtime_defaults()
        env = dict(os.environ)
        # The drivers join this cluster as drivers of their own (their Train actors die with them).
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        # Drivers are Ray jobs wherever the cluster runs a job server (the dashboard on its head):
        # then any controller, on any node, sees them, stops them and reads their logs. Without one,
        # they are processes of this actor's host. A restart on another node gets the same
        # `driver_resources` (Ray keeps the constructor's arguments): drivers keep their placement.
        self.controller = Controller(
            root, registry_root, env=env, store_url=store_url, ray_jobs=cluster_job_server(driver_resources)
        )
        self.poll_s = poll_s
        self.started_at = time.time()
        self._wake = threading.Event()
        threading.Thread(target=self._loop, name="clusterft-controller", daemon=True).start()

    def _loop(self) -> None:
        supervise(self.controller, self._wake, self.poll_s)
        # The store stayed unusable: end the process (sys.exit in a thread would end only this
        # thread, leaving an actor that looks alive and moves no job); Ray restarts the actor.
        os._exit(1)

    def wake(self) -> None:
        """Act now rather than at the next poll (after a submit, cancel or resume)."""
        self._wake.set()

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "root": str(self.controller.root),
            "registry": str(self.controller.registry.root),
            "store": self.controller.store.where,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "started_at": self.started_at,
            "runs": {job_id: run.name for job_id, run in self.controller.runs.items()},
            "job_server": self.controller.ray_jobs.address if self.controller.ray_jobs else None,
            "driver_resources": self.controller.ray_jobs.driver_resources
            if self.controller.ray_jobs
            else None,
        }


def check_same_controller(info: dict[str, Any], root: Path, registry_root: Path, store: str) -> None:
    """A UserError unless the running controller (`info`) serves this root, registry and job store
    (`store` as `describe` names it): one cluster, one job store."""
    if (info["root"], info["registry"], info.get("store")) == (str(root), str(registry_root), store):
        return
    raise UserError(
        f"this Ray cluster's controller keeps jobs in {info.get('store') or info['root']} (root "
        f"{info['root']}, registry {info['registry']}), not {store} (root {root}, registry {registry_root}); "
        f"use its --root, --registry and --store-url, or stop it: "
        f"ray.kill(ray.get_actor({CONTROLLER_NAME!r}, namespace={NAMESPACE!r}))"
    )


def get_or_start_controller(
    root: str | Path,
    registry_root: str | Path,
    *,
    poll_s: float = 0.5,
    store_url: str | None = None,
    scheduling_strategy: Any = None,
    driver_resources: dict[str, float] | None = None,
) -> Any:
    """The running controller actor, or a new detached one (the caller is connected to Ray) keeping
    its jobs in `store_url` (default: SQLite in `root`). Refuses a controller that serves a different
    root, registry or store. `scheduling_strategy`: Ray's, for where a new one starts (e.g. a soft
    node affinity: when that node is lost, Ray restarts the actor on another). `driver_resources`: the
    Ray resources each driver (a Ray job) needs, so Ray runs it on a node holding them and, after that
    node is lost, runs the next attempt on another (ray_jobs.py); None: on the head node."""
    import ray

    root, registry_root = Path(root).resolve(), Path(registry_root).resolve()
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(JobControllerActor)
    actor = actor_cls.options(
        name=CONTROLLER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=scheduling_strategy,
    ).remote(str(root), str(registry_root), poll_s, store_url, driver_resources)
    info = ray.get(actor.info.remote())
    check_same_controller(info, root, registry_root, describe(store_location(root, store_url)))
    return actor


def connect_controller(root: str | Path, registry_root: str | Path, store_url: str | None = None) -> object:
    """Join the running Ray cluster and return its controller actor (started if absent, placing its
    drivers by $CLUSTERFT_DRIVER_RESOURCES)."""
    driver_resources = parse_driver_resources(os.environ.get(DRIVER_RESOURCES_ENV, ""))
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False, namespace=NAMESPACE)
        except ConnectionError as err:
            raise UserError(
                f"no Ray cluster to run the controller on ({err}); start one with "
                "`RAY_AUTH_MODE=disabled ray start --head --num-cpus=N` or set RAY_ADDRESS"
            ) from None
    return get_or_start_controller(
        root, registry_root, store_url=store_url, driver_resources=driver_resources or None
    )
