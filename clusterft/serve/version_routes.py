"""The HTTP face of model versions: GET /health with the version story, POST /v1/admin/reload (switch
now rather than at the next alias poll), the x-clusterft-model-version and x-clusterft-model-alias
(production or canary) headers on every response that ran on an engine, and the request's routing key
between production and canary (clusterft/serve/routing.py: one per HTTP request, so a request sent
back for another tokenizer goes to the same version again). Routes are methods of a mixin of the
ingress class, so Serve binds them to the ingress replica like the ingress's own routes.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from ray.exceptions import RayError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clusterft.http import EdgePolicy
from clusterft.serve.errors import engine_error
from clusterft.serve.routing import SESSION_HEADER, reset_routing_key, set_routing_key

MODEL_VERSION_HEADER = "x-clusterft-model-version"
MODEL_ALIAS_HEADER = "x-clusterft-model-alias"
router = APIRouter()
# One holder per HTTP request: the ingress notes the version of the engine that admitted the request,
# the middleware puts it in the response head. A mutable dict, so tasks spawned inside see it too.
_request_version: ContextVar[dict[str, str] | None] = ContextVar("clusterft_request_version", default=None)


def note_model_version(chunk: dict[str, Any]) -> None:
    """Record the version a request's first engine chunk names, for the response header."""
    holder = _request_version.get()
    if holder is not None and chunk.get("model_version"):
        holder["version"] = chunk["model_version"]
        if chunk.get("model_alias"):
            holder["alias"] = chunk["model_alias"]


class ModelVersionHeader:
    """ASGI middleware adding x-clusterft-model-version to responses whose request reached an engine."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        token = _request_version.set(holder)
        route_token = set_routing_key(dict(scope["headers"]).get(SESSION_HEADER.encode()))

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start" and "version" in holder:
                headers = list(message.get("headers", []))
                headers.append((MODEL_VERSION_HEADER.encode(), holder["version"].encode()))
                if "alias" in holder:
                    headers.append((MODEL_ALIAS_HEADER.encode(), holder["alias"].encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_version)
        finally:
            _request_version.reset(token)
            reset_routing_key(route_token)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = None  # e.g. "v3"; None: wherever the followed alias points now


class VersionRoutes:
    """Mixin of the ingress (which provides `engine`, `admin`, `edge_policy` and `APIError`'s handlers;
    its RequestGuard checks the admin key of /v1/admin/reload)."""

    engine: Any
    admin: Any  # the app's AdminRecord handle
    edge_policy: EdgePolicy

    async def _engine_call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.engine, method).remote(*args)
        except RayError as exc:
            raise engine_error(exc) from exc

    @router.get("/health")
    async def health(self, request: Request) -> JSONResponse:
        """200 while an engine serves; `degraded` when the last version switch failed (the previous
        version still serves). Open: the model and its version to anyone, the rest of the version story
        (the last error, drains, switches) only to callers with the API key."""
        status = await self._engine_call("status")
        health = {"status": "degraded" if status["last_error"] else "ok"}
        if self.edge_policy.is_authorized(request):
            return JSONResponse({**health, **status})
        return JSONResponse({**health, "model": status["model"], "version": status["version"]})

    @router.post("/v1/admin/reload")
    async def reload(self, request: Request, body: ReloadRequest | None = None) -> dict[str, Any]:
        """Switch every engine replica to the alias's version (or `version`) now, rather than at its
        next alias poll; answers once all live replicas have run the reload. A version that could not
        be loaded is a 422 naming it and why (the admin may see the error; it is not a server fault:
        the previous version still serves); replicas that end on different versions are a 409 naming
        them (admin.reload_answer)."""
        from clusterft.serve.admin import change_everywhere, reload_answer

        return reload_answer(await change_everywhere(self.admin, "reload", body.version if body else None))
