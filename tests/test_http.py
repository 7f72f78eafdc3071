"""clusterft/http.py: the bearer check and OpenAI-schema errors every HTTP surface shares."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from clusterft.http import (
    REQUEST_ID_HEADER,
    APIError,
    EdgePolicy,
    RequestGuard,
    add_error_handlers,
    check_bearer,
)


class Body(BaseModel):
    n: int


class Stops(BaseModel):
    stop: str | list[str] | None = None


def make_client() -> TestClient:
    app = FastAPI()
    add_error_handlers(app)

    @app.post("/echo")
    def echo(body: Body, request: Request) -> dict:
        check_bearer(request, "k3y")
        if body.n == 0:
            raise APIError(503, "busy")
        if body.n < 0:
            raise RuntimeError("secret detail")
        return {"n": body.n}

    return TestClient(app, raise_server_exceptions=False)


def test_bearer_token_is_required_and_compared_exactly() -> None:
    client = make_client()
    for headers in ({}, {"Authorization": "Bearer k3"}, {"Authorization": "Basic k3y"}):
        response = client.post("/echo", json={"n": 1}, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "AuthenticationError"
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/echo", json={"n": 1}, headers={"Authorization": "bearer k3y"}).json() == {"n": 1}


def test_every_error_has_openai_shape_with_type_from_status() -> None:
    client = make_client()
    auth = {"Authorization": "Bearer k3y"}
    busy = client.post("/echo", json={"n": 0}, headers=auth)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json() == {
        "error": {"message": "busy", "type": "ServiceUnavailableError", "param": None, "code": 503}
    }
    invalid = client.post("/echo", json={"n": "x"}, headers=auth)
    assert invalid.status_code == 400
    assert invalid.json()["error"]["param"] == "n" and invalid.json()["error"]["type"] == "BadRequestError"
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    crashed = client.post("/echo", json={"n": -1}, headers=auth)
    assert crashed.status_code == 500 and crashed.json()["error"]["type"] == "InternalServerError"


def test_a_500_names_a_request_id_and_logs_the_exception_but_never_sends_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="clusterft.http"):
        crashed = make_client().post("/echo", json={"n": -1}, headers={"Authorization": "Bearer k3y"})
    assert crashed.status_code == 500
    request_id = crashed.headers[REQUEST_ID_HEADER]
    assert "secret detail" not in crashed.text and "RuntimeError" not in crashed.text
    assert (
        crashed.json()["error"]["message"] == f"internal error; the server logged it as request {request_id}"
    )
    [record] = [r for r in caplog.records if request_id in r.getMessage()]
    assert record.exc_info is not None and str(record.exc_info[1]) == "secret detail"


def test_a_stream_chunk_round_trips_into_the_same_error() -> None:
    error = APIError(404, "no such model", "model")
    again = APIError.from_chunk(error.chunk())
    assert (
        again.body()
        == error.body()
        == {"error": {"message": "no such model", "type": "NotFoundError", "param": "model", "code": 404}}
    )


def guarded_client(max_request_bytes: int = 1000) -> TestClient:
    """An app behind RequestGuard: /v1 needs the key "k3y", /v1/admin the admin key "adm1n"."""
    app = FastAPI()
    add_error_handlers(app)
    app.add_middleware(RequestGuard, policy=lambda: EdgePolicy("k3y", "adm1n", max_request_bytes))

    @app.post("/v1/echo")
    def echo(body: Body) -> dict:
        return {"n": body.n}

    @app.post("/v1/admin/echo")
    def admin_echo(body: Body) -> dict:
        return {"n": body.n}

    @app.post("/open")
    def open_echo(body: Body) -> dict:
        return {"n": body.n}

    return TestClient(app, raise_server_exceptions=False)


def test_the_key_is_checked_before_the_body_is_parsed() -> None:
    client = guarded_client()
    # Without the key: 401 whatever the body is (a dependency would have answered 400 first).
    for content in (b'{"n": "not a number"}', b"{not json", b"x" * 5000):
        response = client.post("/v1/echo", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
    key, admin = {"Authorization": "Bearer k3y"}, {"Authorization": "Bearer adm1n"}
    assert client.post("/v1/echo", json={"n": "x"}, headers=key).status_code == 400
    assert client.post("/v1/echo", json={"n": 2}, headers=key).json() == {"n": 2}
    assert client.post("/v1/echo", json={"n": 2}, headers=admin).json() == {"n": 2}  # the admin key too
    assert client.post("/v1/admin/echo", json={"n": "x"}, headers=key).status_code == 401
    assert client.post("/v1/admin/echo", json={"n": 3}, headers=admin).json() == {"n": 3}
    assert client.post("/open", json={"n": 4}).json() == {"n": 4}


def test_a_body_over_max_request_bytes_is_413_declared_or_streamed() -> None:
    client = guarded_client(max_request_bytes=1000)
    key = {"Authorization": "Bearer k3y", "content-type": "application/json"}
    padded = b'{"n": 1' + b" " * 1000 + b"}"
    declared = client.post("/v1/echo", content=padded, headers=key)
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"]["type"] == "RequestTooLargeError"
    assert "1000 bytes" in declared.json()["error"]["message"]
    streamed = client.post("/v1/echo", content=iter([padded[:600], padded[600:]]), headers=key)
    assert streamed.status_code == 413, streamed.text
    assert "content-length" not in streamed.request.headers  # sent chunked: counted while read
    assert client.post("/open", content=padded, headers=key).status_code == 413
    fits = b'{"n": 5' + b" " * 900 + b"}"
    assert client.post("/v1/echo", content=fits, headers=key).json() == {"n": 5}
    assert client.post("/v1/echo", content=iter([fits[:500], fits[500:]]), headers=key).json() == {"n": 5}


def test_a_validation_error_names_the_field_not_the_union_member_or_the_source() -> None:
    app = FastAPI()
    add_error_handlers(app)

    @app.post("/stops")
    def stops(body: Stops, limit: int = 0) -> dict:
        return {}

    client = TestClient(app)
    error = client.post("/stops", json={"stop": 5}).json()["error"]
    assert error["param"] == "stop", error
    error = client.post("/stops", params={"limit": "x"}, json={}).json()["error"]
    assert error["param"] == "limit" and error["message"].startswith("limit: "), error
