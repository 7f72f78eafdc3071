"""clusterft/http.py: the bearer check and OpenAI-schema errors every HTTP surface shares."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from clusterft.http import APIError, add_error_handlers, check_bearer


class Body(BaseModel):
    n: int


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


def test_a_stream_chunk_round_trips_into_the_same_error() -> None:
    error = APIError(404, "no such model", "model")
    again = APIError.from_chunk(error.chunk())
    assert (
        again.body()
        == error.body()
        == {"error": {"message": "no such model", "type": "NotFoundError", "param": "model", "code": 404}}
    )
