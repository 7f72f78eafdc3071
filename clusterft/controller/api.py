"""The jobs REST API: the CLI's operations over HTTP, documented by FastAPI's OpenAPI schema.

    POST /v1/jobs                   {"spec": {...} | "spec_yaml": "...", "name": ...} → 201 the job;
                                    a retry with the same `Idempotency-Key` header → the same job
    GET  /v1/jobs                   jobs, newest first
    GET  /v1/jobs/{id}              state, progress, results, history, log files
    GET  /v1/jobs/{id}/logs         every attempt's log text (text/plain)
    POST /v1/jobs/{id}/cancel       → the job (cancelled; its run is killed)
    POST /v1/jobs/{id}/resume       → the job (resuming)

Bound to 127.0.0.1 unless told otherwise; `serve_api` refuses any other address without an API key
(a submitted job runs its spec's code on the cluster) unless told `insecure`. Reads (GET) need
`Authorization: Bearer <api key>` (or the admin key); writes (submit, cancel, resume) need the admin
key, and are refused (403) when there is an API key but no admin key; with no key at all everything is
open. The key is checked before the body is read (`RequestGuard`, as in the serving ingress): a caller
without it gets the 401 or 403, never a 400 that describes the body's schema; a body over 1 MiB is a
413. Keys are compared in constant time; errors use OpenAI's error schema (clusterft/http.py, shared
with the serving ingress).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from clusterft.config import parse_job_dict
from clusterft.controller.jobs import Jobs, job_record
from clusterft.controller.state import IllegalTransition
from clusterft.controller.store import FolderInUse, IdempotencyKeyReused, StaleState, UnknownJob
from clusterft.errors import UserError
from clusterft.http import (
    API_KEY_ENV,
    Access,
    APIError,
    EdgePolicy,
    RequestGuard,
    add_error_handlers,
    is_loopback,
)

MAX_LIST_LIMIT = 10_000  # GET /v1/jobs?limit= (SQLite takes no integer beyond 64 bits)
MAX_REQUEST_BYTES = 1 << 20  # a job spec is a few KiB of YAML


def jobs_access(method: str, path: str) -> Access:
    """Reads (GET, HEAD) under /v1 need the API key or the admin key; writes (submit, cancel, resume:
    a job runs its spec's code on the cluster) only the admin key; the docs and schema are open."""
    if path != "/v1" and not path.startswith("/v1/"):
        return Access.OPEN
    return Access.CLIENT if method in ("GET", "HEAD") else Access.ADMIN


class SubmitRequest(BaseModel):
    spec: dict[str, Any] | None = Field(
        default=None, description="The job spec as a JSON object (YAML keys)."
    )
    spec_yaml: str | None = Field(default=None, description="The job spec as YAML text.")
    name: str | None = Field(default=None, description="Job and registry model name.")
    base_dir: str | None = Field(
        default=None,
        description="Directory relative paths of the spec are resolved against (default: the server's).",
    )


def create_app(jobs: Jobs, api_key: str | None = None, admin_api_key: str | None = None) -> FastAPI:
    app = FastAPI(
        title="clusterft jobs API",
        version="1",
        description="Submit, follow, cancel and resume fine-tuning jobs run by the clusterft controller.",
    )

    policy = EdgePolicy(api_key, admin_api_key, MAX_REQUEST_BYTES, jobs_access)
    app.add_middleware(RequestGuard, policy=lambda: policy)
    add_error_handlers(app)

    @app.exception_handler(UserError)
    async def _user_error(_request: Request, err: UserError) -> JSONResponse:
        if isinstance(err, UnknownJob):
            return APIError(404, str(err), code="job_not_found").response()
        if isinstance(err, IllegalTransition | StaleState | FolderInUse | IdempotencyKeyReused):
            return APIError(409, str(err), code="conflict").response()
        return APIError(400, str(err)).response()

    @app.post("/v1/jobs", status_code=201)
    def submit(
        body: SubmitRequest,
        idempotency_key: str | None = Header(
            default=None,
            min_length=1,
            max_length=255,
            description="A unique string per job: a retry with the same key returns the first job.",
        ),
    ) -> dict[str, Any]:
        if (body.spec is None) == (body.spec_yaml is None):
            raise APIError(400, "give exactly one of `spec` (object) or `spec_yaml` (text)", "spec")
        try:
            raw = body.spec if body.spec is not None else yaml.safe_load(body.spec_yaml or "")
        except yaml.YAMLError as err:
            raise APIError(400, f"spec_yaml is not valid YAML: {err}", "spec_yaml") from err
        if not isinstance(raw, dict):
            raise APIError(400, "the job spec must be a mapping of keys", "spec")
        spec = parse_job_dict(raw, "request")
        job = jobs.submit(spec, base_dir=body.base_dir, name=body.name, idempotency_key=idempotency_key)
        return job_record(job)

    @app.get("/v1/jobs")
    def list_jobs(limit: int | None = Query(default=None, ge=1, le=MAX_LIST_LIMIT)) -> dict[str, Any]:
        return {"object": "list", "data": [job_record(job) for job in jobs.list(limit=limit)]}

    @app.get("/v1/jobs/{job_id}")
    def status(job_id: str) -> dict[str, Any]:
        return job_record(jobs.get(job_id), jobs.store)

    @app.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse)
    def logs(job_id: str) -> str:
        # A file's text, or a Ray job driver's output from the cluster's job server.
        parts = [f"==> {where} <==\n{text}" for where, text in jobs.log_texts(job_id) if text is not None]
        return "".join(parts)

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        return job_record(jobs.cancel(job_id))

    @app.post("/v1/jobs/{job_id}/resume")
    def resume(job_id: str) -> dict[str, Any]:
        return job_record(jobs.resume(job_id))

    from clusterft.dashboard import mount_dashboard

    mount_dashboard(app, jobs)  # /dashboard and its /v1/dashboard data, behind the same RequestGuard
    return app


def serve_api(
    root: str | Path,
    registry_root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8266,
    api_key: str | None = None,
    admin_api_key: str | None = None,
    insecure: bool = False,
    start_controller: bool = True,
    store_url: str | None = None,
) -> None:
    """Run the API with uvicorn until interrupted (starting the controller on the Ray cluster) over
    the job store `store_url` (default: SQLite in `root`). A UserError for a non-loopback `host`
    without an `api_key`, unless `insecure`."""
    import uvicorn

    if not (insecure or is_loopback(host) or api_key):
        raise UserError(
            f"jobs api: --host {host} exposes the jobs API beyond this machine (a submitted job runs "
            f"code on the cluster), but no API key is set: give --api-key KEY or ${API_KEY_ENV} (and "
            "--admin-api-key for submit/cancel/resume), bind 127.0.0.1, or pass --insecure to serve it "
            "open anyway"
        )
    controller = None
    if start_controller:
        from clusterft.controller.actor import connect_controller

        controller = connect_controller(root, registry_root, store_url)
    jobs = Jobs(root, registry_root, controller=controller, store_url=store_url)
    try:
        uvicorn.run(create_app(jobs, api_key, admin_api_key), host=host, port=port, log_level="info")
    finally:
        jobs.close()
