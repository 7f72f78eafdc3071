"""The jobs REST API under Schemathesis: a thousand requests generated from its own OpenAPI schema,
served by uvicorn on 127.0.0.1 over a real job store (no controller, so jobs stay `submitted`), and
not one is answered with a 500. The two 500s it found (a `limit` past SQLite's integers, `spec_yaml`
that YAML refuses) are pinned below."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis

from clusterft.controller.api import create_app
from clusterft.controller.jobs import Jobs
from tests.http_server import running_server
from tests.openapi_fuzz import fuzz

NUM_EXAMPLES = 1000


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("jobs-api")
    jobs = Jobs(root / "root", root / "registry")
    try:
        with running_server(create_app(jobs), log_level="critical") as base:
            yield base
    finally:
        jobs.close()


def test_limit_beyond_sqlite_integers_is_400(url: str) -> None:
    for limit in (2**70, -(2**70), 0, -1):
        response = httpx.get(f"{url}/v1/jobs", params={"limit": limit})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "limit"
    assert httpx.get(f"{url}/v1/jobs", params={"limit": 5}).status_code == 200


def test_spec_yaml_that_yaml_refuses_is_400(url: str) -> None:
    for text in ("\x06", "a: [1", "\u008c"):
        response = httpx.post(f"{url}/v1/jobs", json={"spec_yaml": text})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "spec_yaml"


def test_generated_requests_get_no_500(url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    report = fuzz(schema, lambda case: case.call(base_url=url, timeout=30), NUM_EXAMPLES)
    print("jobs API fuzz:", report.summary())
    assert report.num_requests == NUM_EXAMPLES
    assert len(report.per_operation) == 6, report.per_operation  # every route was reached
    assert not report.server_errors, "\n".join(report.server_errors[:10])
