"""The routing key of the HTTP request being answered, between a model's production and canary
versions (clusterft/registry/traffic.py): its x-session-id header, else one random key per request.
Set by version_routes' middleware; read where the request is sent to an engine (the ingress passes it
along; an engine serving the routes in process reads it here)."""

from __future__ import annotations

import secrets
from contextvars import ContextVar, Token

SESSION_HEADER = "x-session-id"
_routing_key: ContextVar[str | None] = ContextVar("clusterft_routing_key", default=None)


def routing_key() -> str | None:
    """The routing key of the HTTP request being answered in this process (None: none is)."""
    return _routing_key.get()


def set_routing_key(session: bytes | None) -> Token[str | None]:
    """Start a request's routing key from its x-session-id header value (None: a random one)."""
    return _routing_key.set(session.decode("latin-1") if session else secrets.token_hex(8))


def reset_routing_key(token: Token[str | None]) -> None:
    _routing_key.reset(token)
