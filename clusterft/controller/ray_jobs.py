"""The controller's drivers as Ray jobs: each phase of each attempt is submitted to the cluster's job
server (the dashboard on the head node, `JobSubmissionClient`) under a submission id derived from the
job, its attempt and its phase, and recorded in the job store as the phase's log pointer
(`ray-job://<submission id>`).

Ray, not a pid in one host's /proc, then says whether a driver is alive: a controller restarted on
another node, or a second controller sharing the store, asks the job server about the same id and
re-attaches to a live driver, stops it (cancel) or reads its logs (`clusterft jobs logs`). The id
being derived, not drawn, also makes a launch idempotent: a controller that died between submitting
and recording finds its predecessor's submission ("already exists") instead of starting a second.

Where a driver runs is Ray's choice unless the controller names `driver_resources`: Ray puts a job
with no entrypoint resources on the head node, so losing the head loses the driver with the cluster.
With `driver_resources` (e.g. {"clusterft_driver": 0.01}, a custom resource the nodes fit to host
drivers declare: `ray start --resources='{"clusterft_driver": 1}'`) the driver goes to a live node
holding it; when that node dies, the job server reports the job FAILED ("Job supervisor actor
died"), the controller counts a failed attempt and submits the next one, which Ray places on
another such node and which resumes from the newest valid checkpoint.

Where no job server runs (a local cluster started without the dashboard, or no cluster: the
controller used as a library), drivers are processes of the controller's host (runs.py), as before.

Ray is imported only here, and only when a job server is used.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from clusterft.controller.runs import Phase, RunFiles, driver_command, prepare
from clusterft.controller.store_backend import is_store_url
from clusterft.errors import UserError

JOB_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
"""Where a client finds the job server (Ray's own variable; else $RAY_ADDRESS's cluster)."""
DRIVER_RESOURCES_ENV = "CLUSTERFT_DRIVER_RESOURCES"
"""JSON object of the Ray resources each driver needs, e.g. {"clusterft_driver": 0.01}: where it runs."""
AGENT_WAIT_S = 60.0
"""How long a submission waits for the cluster's job agents to come up."""
logger = logging.getLogger(__name__)
SCHEME = "ray-job://"
"""A log pointer of this scheme names a Ray job's submission id, not a file."""


def submission_id(job_id: str, attempt: int, phase: Phase) -> str:
    """The Ray job of one phase of one attempt: one id per launch, the same from any controller."""
    return f"clusterft-{job_id}-attempt-{attempt}-{phase}"


def pointer(submission: str) -> str:
    return SCHEME + submission


def pointed_submission(path: str) -> str | None:
    """The submission id a log pointer names; None for a file."""
    return path[len(SCHEME) :] if path.startswith(SCHEME) else None


def parse_driver_resources(text: str, source: str = DRIVER_RESOURCES_ENV) -> dict[str, float]:
    """The driver resources a JSON object names ({} for empty text), checked: resource names to
    positive amounts. `source` names where the text came from, for the error."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        value = err
    if not isinstance(value, dict) or not all(
        isinstance(name, str)
        and isinstance(amount, int | float)
        and not isinstance(amount, bool)
        and amount > 0
        for name, amount in value.items()
    ):
        raise UserError(
            f"{source} must be a JSON object of Ray resource names to positive amounts, e.g. "
            f'{{"clusterft_driver": 0.01}} for nodes started with --resources=\'{{"clusterft_driver": 1}}\'; '
            f"got {text!r}"
        )
    return {name: float(amount) for name, amount in value.items()}


def cluster_job_server(driver_resources: dict[str, float] | None = None) -> RayJobs | None:
    """The job server of the Ray cluster this process is connected to, checked to be that cluster's
    (same session: on a host running several clusters, a stale address may lead to another's); None
    when the cluster has none that answers, and the drivers stay processes of this host.
    `driver_resources`: the Ray resources each driver needs (where Ray places it; RayJobs)."""
    import ray

    address = job_server_address()
    if address is None:
        return None
    try:
        server = RayJobs(address, driver_resources)
        session = server.session_name()
    except (UserError, RuntimeError, ConnectionError):
        # e.g. a local cluster started without the dashboard still names where one would be
        logger.info("controller: no job server answers at %s: drivers run as processes", address)
        return None
    if session != ray.get_runtime_context().get_session_name():
        logger.warning(
            "controller: the job server at %s serves another Ray cluster (%s): drivers run as processes",
            address,
            session,
        )
        return None
    return server


def job_server_address() -> str | None:
    """The job server (dashboard) of the Ray cluster this process is connected to, as the dashboard
    publishes it in the GCS; None when the cluster runs none (started with include_dashboard=False)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    address = _internal_kv_get(
        ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
    )
    if not address:
        return None
    address = address.decode()
    return address if "://" in address else f"http://{address}"


def client_job_server() -> str | None:
    """The job server a client reaches: $RAY_API_SERVER_ADDRESS, else that of the cluster this
    process is connected to; None: Ray's own lookup ($RAY_ADDRESS, or the one local cluster)."""
    if address := os.environ.get(JOB_SERVER_ENV):
        return address
    import ray

    return job_server_address() if ray.is_initialized() else None


@dataclass(frozen=True)
class DriverState:
    """What the job server says of a driver: alive (pending or running), or how it ended."""

    alive: bool
    ended: str = ""
    """How it ended, for a failure without a result: "exited with code 1", "was stopped", ..."""


class RayJobs:
    """Launch, watch, stop and read the drivers through a Ray job server at `address`
    (http://head:8265; None: the one of $RAY_ADDRESS's cluster, or of the local one). Each driver
    needs `driver_resources` (Ray's entrypoint_resources: it runs on a node holding them); None or
    {}: Ray's default, the head node."""

    def __init__(self, address: str | None, driver_resources: dict[str, float] | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.driver_resources = dict(driver_resources or {})
        try:
            self._client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError) as err:
            raise UserError(
                f"no Ray job server at {address or 'the Ray cluster of $RAY_ADDRESS'} ({err}): the "
                f"drivers run as Ray jobs there; set ${JOB_SERVER_ENV} to the head's dashboard "
                "(http://HEAD:8265), and start the head with it (`ray start --head --include-dashboard=true`)"
            ) from None

    def submit(self, files: RunFiles, job_id: str, attempt: int, store: str | Path) -> str:
        """Submit the phase's driver (or find the one a predecessor submitted): its submission id.
        A store URL with a password is left to the nodes' own environment (`$CLUSTERFT_STORE_URL`,
        e.g. from a Secret): the job server shows a job's runtime environment to anyone who asks."""
        submission = submission_id(job_id, attempt, files.phase)
        if self.state(submission) is not None:
            return submission  # a predecessor submitted it (and it may have written its result)
        prepare(files)
        command, env = driver_command(files, job_id, store)
        if is_store_url(store) and has_password(str(store)):
            env = {}
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                self._client.submit_job(
                    entrypoint=shlex.join(command),
                    submission_id=submission,
                    runtime_env={"env_vars": env} if env else None,
                    entrypoint_resources=self.driver_resources or None,
                    metadata={"clusterft_job": job_id, "attempt": str(attempt), "phase": files.phase},
                )
                return submission
            except RuntimeError as err:
                if "already exists" in str(err):
                    return submission  # a predecessor submitted it: this is the same driver
                # A node's job agent starts after the dashboard: a young cluster refuses for a while.
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
            time.sleep(1.0)

    def state(self, submission: str) -> DriverState | None:
        """The driver's state, or None when the job server has no such job (never submitted, or a
        cluster that was replaced)."""
        try:
            info = self._client.get_job_info(submission)
        except RuntimeError as err:
            if "404" in str(err) or "does not exist" in str(err):
                return None
            raise
        if not info.status.is_terminal():
            return DriverState(alive=True)
        if info.status.value == "STOPPED":
            return DriverState(alive=False, ended="was stopped")
        code = getattr(info, "driver_exit_code", None)
        how = f"exited with code {code}" if code is not None else f"ended {info.status.value}"
        return DriverState(alive=False, ended=f"{how}: {info.message}" if info.message else how)

    def stop(self, submission: str) -> None:
        """Ask the job server to stop the driver (SIGTERM, then SIGKILL after its grace period);
        nothing when it is unknown or over."""
        try:
            self._client.stop_job(submission)
        except RuntimeError as err:
            if "404" not in str(err) and "does not exist" not in str(err):
                raise

    def logs(self, submission: str) -> str:
        return self._client.get_job_logs(submission)

    def session_name(self) -> str:
        """The Ray session (cluster) whose jobs this job server runs."""
        return self._client._do_request("GET", "/api/version").json()["session_name"]


def has_password(url: str) -> bool:
    parts = urlsplit(url)
    return parts.password is not None or "password=" in parts.query
