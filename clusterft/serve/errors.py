"""Errors of the HTTP edge, in OpenAI's schema, and what the ingress makes of a failed engine call.

An engine replica that dies (a crash, an OOM kill, a node gone) shows up at the ingress as a Ray
actor error on the deployment handle, at the first chunk or in the middle of a stream. The client
then gets a 503 with Retry-After (or, for a stream already sent, an SSE error event) saying the
replica died and to retry: Serve replaces the replica, and a retry lands on a live one.
"""

from __future__ import annotations

from typing import Any

from ray.exceptions import RayActorError, RayError

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error response: HTTP status, OpenAI error type, and the field it concerns."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    @classmethod
    def from_chunk(cls, chunk: dict[str, Any]) -> APIError:
        """The error of an engine `{"error": {...}}` chunk."""
        e = chunk["error"]
        return cls(e["status"], e["message"], e["type"], e.get("param"))

    def chunk(self) -> dict[str, Any]:
        """This error as an engine chunk, for a stream whose response has started."""
        return {
            "error": {"status": self.status, "message": self.message, "type": self.type, "param": self.param}
        }


def engine_error(exc: RayError) -> APIError:
    """The 503 for a failed call on the engine deployment's handle."""
    if isinstance(exc, RayActorError):
        message = (
            f"the engine replica died while handling this request ({type(exc).__name__}); "
            "it was not completed: retry it (Serve is starting a replacement replica)"
        )
    else:
        message = f"the engine could not handle this request ({type(exc).__name__}: {exc}); retry it"
    return APIError(503, message, "ServiceUnavailableError")
