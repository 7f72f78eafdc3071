"""What every HTTP surface of clusterft shares (the serving ingress, the jobs REST API): the bearer
token check and errors in OpenAI's schema.

    {"error": {"message": "...", "type": "BadRequestError", "param": "prompt", "code": 400}}

`type` follows from the status, named as the official `openai` client names its exception for that
status (BadRequestError, AuthenticationError, NotFoundError, ...); `code` is the status unless a
more precise code is given (`invalid_api_key`, `job_not_found`). A 503 carries Retry-After, a 401
WWW-Authenticate.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def check_bearer(request: Request, api_key: str | None) -> None:
    """Raise the 401 unless `api_key` is None or the request sends `Authorization: Bearer <api_key>`.
    Constant time: how long the comparison takes must not tell how much of a guess was right."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
        )


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
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return APIError(400, f"{param or 'request'}: {first.get('msg')}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
