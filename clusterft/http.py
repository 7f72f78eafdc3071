"""What every HTTP surface of clusterft shares (the serving ingress, the jobs REST API): the bearer
token check and errors in OpenAI's schema.

    {"error": {"message": "...", "type": "BadRequestError", "param": "prompt", "code": 400}}

`type` follows from the status, named as the official `openai` client names its exception for that
status (BadRequestError, AuthenticationError, NotFoundError, ...); `code` is the status unless a
more precise code is given (`invalid_api_key`, `job_not_found`). A 503 carries Retry-After, a 401
WWW-Authenticate. A 500 never says what went wrong inside: it names a request id, under which the
exception is logged.

`RequestGuard` (ASGI middleware) answers 401 and 413 before any route reads the request, so that an
unauthenticated caller learns nothing about the body's schema and no handler parses an oversized body.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"

RETRY_AFTER_S = 1
API_KEY_ENV = "CLUSTERFT_API_KEY"  # the bearer key of inference and reads
ADMIN_API_KEY_ENV = "CLUSTERFT_ADMIN_API_KEY"  # the bearer key of admin routes
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error schema for an HTTP status."""
    return {
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": status if code is None else code,
        }
    }


class APIError(Exception):
    """An error response: HTTP status, message, the request field it concerns, an optional code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return error_type(self.status)

    @classmethod
    def from_chunk(cls, chunk: dict[str, Any]) -> APIError:
        """The error of an engine stream's `{"error": {"status", "message", "param"}}` chunk."""
        error = chunk["error"]
        return cls(error["status"], error["message"], error.get("param"))

    def chunk(self) -> dict[str, Any]:
        """This error as a stream chunk, for a response that has already started."""
        return {"error": {"status": self.status, "message": self.message, "param": self.param}}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def bearer_matches(request: Request, key: str) -> bool:
    """Whether the request sends `Authorization: Bearer <key>` or `x-api-key: <key>` (what Anthropic's
    clients send). Constant time: how long the comparison takes must not tell how much of a guess was
    right."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return True
    x_api_key = request.headers.get("x-api-key")
    return x_api_key is not None and hmac.compare_digest(x_api_key.strip().encode(), key.encode())


def check_bearer(request: Request, api_key: str | None) -> None:
    """Raise the 401 unless `api_key` is None or the request sends it (`bearer_matches`)."""
    if api_key is not None and not bearer_matches(request, api_key):
        raise APIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
            code="invalid_api_key",
        )


class Access(enum.Enum):
    """The key a request needs, by its method and path (an `EdgePolicy`'s `access` decides)."""

    OPEN = "open"  # none
    CLIENT = "client"  # the API key, or the admin key
    ADMIN = "admin"  # the admin key (see check_admin_bearer)


def serving_access(method: str, path: str) -> Access:
    """The serving app's rule: paths under /v1/admin need the admin key; every other path under /v1,
    and /metrics, the API key (or the admin key); the rest (/health, docs) is open."""
    if path == "/v1/admin" or path.startswith("/v1/admin/"):
        return Access.ADMIN
    if path in ("/v1", "/metrics") or path.startswith("/v1/"):
        return Access.CLIENT
    return Access.OPEN


@dataclass(frozen=True)
class EdgePolicy:
    """Who may call what, and how big a request may be (`RequestGuard` applies it)."""

    api_key: str | None  # what Access.CLIENT requests need (or the admin key); None: open
    admin_api_key: str | None  # what Access.ADMIN requests need (see check_admin_bearer)
    max_request_bytes: int  # a larger body is a 413
    access: Callable[[str, str], Access] = serving_access  # (method, path) -> the key it needs
    # The response of a refused request (401/403/413), in the shape its route speaks (e.g. Anthropic's
    # on /v1/messages); None: OpenAI's (APIError.response).
    error_response: Callable[[Request, APIError], Response] | None = None

    def refuse(self, request: Request, error: APIError) -> Response:
        return self.error_response(request, error) if self.error_response else error.response()

    def is_admin(self, request: Request) -> bool:
        """Whether the request carries the admin key (False when there is none)."""
        return self.admin_api_key is not None and bearer_matches(request, self.admin_api_key)

    def is_authorized(self, request: Request) -> bool:
        """Whether the request may use the /v1 routes that are not admin routes."""
        return self.api_key is None or bearer_matches(request, self.api_key) or self.is_admin(request)

    def check(self, request: Request) -> None:
        """The 401 (or 403) for a request without the key its method and path need (`access`)."""
        access = self.access(request.method, request.url.path)
        if access is Access.ADMIN:
            check_admin_bearer(request, self.admin_api_key, self.api_key)
        elif access is Access.CLIENT and not self.is_authorized(request):
            check_bearer(request, self.api_key)


class RequestGuard:
    """ASGI middleware: the bearer check (`EdgePolicy.check`), then the body, read whole here and at
    most `max_request_bytes` of it (a Content-Length or a body over that is a 413), then the app, which
    reads the body again from memory. `policy` is called per request (Serve's ingress knows its policy
    only once its replica is built)."""

    def __init__(self, app: ASGIApp, policy: Callable[[], EdgePolicy]) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy()
        request = Request(scope)
        try:
            policy.check(request)
            body = await _read_body(request, receive, policy.max_request_bytes)
        except APIError as error:
            await policy.refuse(request, error)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # the disconnect a streaming response listens for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _read_body(request: Request, receive: Receive, max_bytes: int) -> bytes:
    too_large = APIError(
        413,
        f"the request body is over {max_bytes} bytes (max_request_bytes): send less",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > max_bytes:
            raise too_large
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def check_admin_bearer(request: Request, admin_api_key: str | None, api_key: str | None) -> None:
    """The check of an admin route (adapters, reload, job submit/cancel/resume): check_bearer with the
    admin key. Without an admin key, a 403 when the server has an API key (its holders are clients,
    not admins); open only when it has no key at all, which only a loopback bind (or --insecure) allows."""
    if admin_api_key is None and api_key is not None:
        raise APIError(
            403,
            f"admin routes are off: this server has an API key but no admin key; start it with "
            f"--admin-api-key KEY or ${ADMIN_API_KEY_ENV} and send 'Authorization: Bearer <admin key>'",
            code="admin_disabled",
        )
    check_bearer(request, admin_api_key)


def is_loopback(host: str) -> bool:
    """True when only this machine can reach a server bound to `host` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname: only localhost is known to name this machine
        return False


def add_error_handlers(app: FastAPI) -> None:
    """Every error `app` answers, in OpenAI's schema: APIError, request validation (400, naming the
    field), HTTP errors of routing (404, 405), and anything else (500)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = validation_message(exc.errors())
        return APIError(400, f"{param or 'request'}: {message}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex
        logger.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=exc)
        response = APIError(
            500, f"internal error; the server logged it as request {request_id}", code="internal_error"
        ).response()
        response.headers[REQUEST_ID_HEADER] = request_id
        return response


# A union member's tag in pydantic's error location (`str`, `list[int]`, `ChatMessage`), not a field.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*|[A-Z].*)$")


def validation_message(errors: Sequence[Any]) -> tuple[str | None, str]:
    """The field and message of a request's validation errors: the first error that is not just a
    union member the value did not match (`"stop": [17 strings]` is "too many", not "not a string"),
    its location without its source (body, query, ...) and union tags, its message without
    pydantic's "Value error, " prefix."""
    if not errors:
        return None, "invalid request"
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    loc = list(first.get("loc", ()))[1:]  # [0] is body, query, path, header or cookie
    param = ".".join(str(p) for p in loc if not _UNION_TAG.match(str(p))) or None
    return param, str(first.get("msg", "invalid")).removeprefix("Value error, ")
