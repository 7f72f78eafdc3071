"""The dashboard's routes, mounted on the jobs API (`mount_dashboard`), so it shares its auth:

    GET  /dashboard, /dashboard/assets/{file}     the page and its vendored scripts: open, they hold
                                                  no data (the page asks for the key and sends it)
    GET  /v1/dashboard/jobs/{id}/metrics?after=N  step records after step N (the live curves)
    GET  /v1/dashboard/jobs/{id}/checkpoints      bundles: step, size, valid
    GET  /v1/dashboard/jobs/{id}/evaluation       eval metrics against the spec's gates
    GET  /v1/dashboard/jobs/{id}/logs?tail=BYTES  the end of the newest attempt's log
    GET  /v1/dashboard/registry                   models, versions, aliases and their history
    POST /v1/dashboard/registry/{model}/promote   {"version", "alias"}    (admin key)
    POST /v1/dashboard/registry/{model}/rollback  {"alias"}               (admin key)
    POST /v1/dashboard/registry/{model}/canary    {"weight", "version"?}  (admin key)
    GET  /v1/dashboard/serving                    the serve app's /metrics, summarized
    POST /v1/dashboard/validate                   {"spec_yaml"} → problems with their lines (admin key)

Reads under /v1 take the API key, writes the admin key (the jobs API's `jobs_access`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, Field

from clusterft.config.loader import SpecError, parse_job_yaml
from clusterft.controller.jobs import Jobs
from clusterft.dashboard.views import (
    CheckpointLister,
    evaluation,
    metric_series,
    registry_view,
    serving_summary,
)
from clusterft.http import API_KEY_ENV, APIError
from clusterft.registry.registry import Registry

STATIC = Path(__file__).parent / "static"
SERVE_URL_ENV = "CLUSTERFT_SERVE_URL"  # where the serving page reads the app's /metrics
MAX_TAIL_BYTES = 1 << 20
SCRAPE_TIMEOUT_S = 2.0


class PromoteRequest(BaseModel):
    version: str = Field(description="The version to point the alias at (v3, 3 or latest).")
    alias: str = Field(default="production", description="production or canary.")


class RollbackRequest(BaseModel):
    alias: str = Field(default="production", description="production or canary.")


class CanaryRequest(BaseModel):
    weight: int = Field(description="Percent of sessions the canary serves, 0-100; production the rest.")
    version: str | None = Field(
        default=None, description="Point the canary at this version first (v3 or 3); none: keep it."
    )


class ValidateRequest(BaseModel):
    spec_yaml: str = Field(description="The job spec as YAML text.")


class RequestRate:
    """Requests per second between two scrapes of the serve app's finished-request counter."""

    def __init__(self) -> None:
        self.last: tuple[float, float] | None = None  # (monotonic time, requests_total)

    def update(self, total: float, now: float) -> float | None:
        previous, self.last = self.last, (now, total)
        if previous is None or now <= previous[0] or total < previous[1]:  # first, or the app restarted
            return None
        return (total - previous[1]) / (now - previous[0])


def dashboard_router(jobs: Jobs, serve_url: str | None = None) -> APIRouter:
    """The dashboard's routes over `jobs` (its store and registry) and the serve app at `serve_url`
    (default $CLUSTERFT_SERVE_URL; none: the serving page says where to set it)."""
    router = APIRouter(include_in_schema=False)
    registry = Registry(jobs.registry_root)
    checkpoints = CheckpointLister()
    rate = RequestRate()
    serve_url = serve_url or os.environ.get(SERVE_URL_ENV)

    @router.get("/dashboard")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @router.get("/dashboard/assets/{name}")
    def asset(name: str) -> FileResponse:
        path = STATIC / name
        if "/" in name or name.startswith(".") or name == "index.html" or not path.is_file():
            raise APIError(404, f"no dashboard asset {name!r}")
        return FileResponse(path)

    @router.get("/v1/dashboard/jobs/{job_id}/metrics")
    def metrics(job_id: str, after: int = Query(default=0, ge=0)) -> dict[str, Any]:
        return {"object": "list", "data": metric_series(jobs.get(job_id), after)}

    @router.get("/v1/dashboard/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str) -> dict[str, Any]:
        return {"object": "list", "data": checkpoints.list(jobs.get(job_id))}

    @router.get("/v1/dashboard/jobs/{job_id}/evaluation")
    def job_evaluation(job_id: str) -> dict[str, Any]:
        return evaluation(jobs.get(job_id))

    @router.get("/v1/dashboard/jobs/{job_id}/logs", response_class=PlainTextResponse)
    def log_tail(job_id: str, tail: int = Query(default=16384, ge=1, le=MAX_TAIL_BYTES)) -> str:
        paths = [path for path in jobs.log_paths(job_id) if path.is_file()]
        if not paths:
            return ""
        with open(paths[-1], "rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - tail))
            return f"==> {paths[-1]} <==\n" + log.read().decode(errors="replace")

    @router.get("/v1/dashboard/registry")
    def registry_models() -> dict[str, Any]:
        return registry_view(registry, time.time())

    @router.post("/v1/dashboard/registry/{model}/promote")
    def promote(model: str, body: PromoteRequest) -> dict[str, Any]:
        change = registry.promote(model, body.version, body.alias)
        return {"changed": change is not None, "change": change and asdict(change)}

    @router.post("/v1/dashboard/registry/{model}/rollback")
    def rollback(model: str, body: RollbackRequest) -> dict[str, Any]:
        return {"changed": True, "change": asdict(registry.rollback(model, body.alias))}

    @router.post("/v1/dashboard/registry/{model}/canary")
    def canary(model: str, body: CanaryRequest) -> dict[str, Any]:
        if body.version is None:
            change = registry.set_canary_weight(model, body.weight, reason="dashboard")
        else:
            change = registry.set_canary(model, body.version, body.weight, reason="dashboard")
        return {"changed": change is not None, "change": change and asdict(change)}

    @router.get("/v1/dashboard/serving")
    def serving() -> dict[str, Any]:
        if not serve_url:
            return {
                "url": None,
                "reachable": False,
                "error": f"no serve app configured: set ${SERVE_URL_ENV}",
            }
        key = os.environ.get(API_KEY_ENV)
        try:
            response = httpx.get(
                f"{serve_url.rstrip('/')}/metrics",
                headers={"Authorization": f"Bearer {key}"} if key else None,
                timeout=SCRAPE_TIMEOUT_S,
            )
            response.raise_for_status()
        except httpx.HTTPError as err:
            return {"url": serve_url, "reachable": False, "error": f"{type(err).__name__}: {err}"}
        summary = serving_summary(response.text)
        summary["requests_per_s"] = rate.update(summary["requests_total"], time.monotonic())
        return {"url": serve_url, "reachable": True, "error": None, **summary}

    @router.post("/v1/dashboard/validate")
    def validate(body: ValidateRequest) -> dict[str, Any]:
        try:
            parse_job_yaml(body.spec_yaml, "editor")
        except SpecError as err:
            return {"ok": False, "problems": [asdict(p) for p in err.problems]}
        return {"ok": True, "problems": []}

    return router


def mount_dashboard(app: FastAPI, jobs: Jobs) -> None:
    """Add the dashboard's routes to the jobs API app (its RequestGuard covers them)."""
    app.include_router(dashboard_router(jobs))
