"""The dashboard in a real headless Chromium against a live controller (a local Ray cluster, the
controller actor, a real training driver) behind the jobs API on a real port: every page loads,
the loss curve grows while the job trains, promote, rollback and the canary weight work through
the buttons, the editor marks a bad key at its line, and no page asks anything of any host but
127.0.0.1.
Screenshots land in ARTIFACTS_DIR/dashboard (default tests/artifacts/dashboard)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from clusterft.controller.api import create_app
from clusterft.controller.jobs import Jobs
from clusterft.dashboard.routes import SERVE_URL_ENV
from clusterft.registry.registry import Registry
from tests.controller.conftest import tiny_llama  # noqa: F401
from tests.controller.test_controller_ray import jobs, root  # noqa: F401  (the live controller)
from tests.dashboard.conftest import ENGINE_STATS
from tests.http_server import running_server
from tests.train.helpers import make_job

pytestmark = pytest.mark.slow
KEY, ADMIN = "sk-read-0123456789", "sk-admin-0123456789"
WAIT_MS = 120_000
START_MS = 300_000  # a Ray Train worker group on a loaded 2-core machine can take minutes to come up


def serve_metrics_app() -> Starlette:
    """The serve app's /metrics exposition, rendered by its own ServeMetrics from engine stats as
    two replicas report them (the Serve app itself is the serve tests' business)."""
    from clusterft.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    metrics.ttft.observe(0.25)
    metrics.observe_tokens(0.1, 2)
    stats = {**ENGINE_STATS, "num_kv_blocks": 64, "prefix_cache_queries": 10, "prefix_cache_hits": 4}

    def scrape(_request: Any) -> Response:
        metrics.requests.labels("200").inc()
        return Response(metrics.render({"r1": stats, "r2": stats}), media_type="text/plain")

    return Starlette(routes=[Route("/metrics", scrape)])


@pytest.fixture(scope="module")
def site(jobs: Jobs, tiny_llama: Path) -> Iterator[str]:  # noqa: F811
    """The jobs API with the dashboard, over the live controller; two registered versions of
    `tiny-dash` to promote and roll back."""
    registry = Registry(jobs.registry_root)
    for _ in range(2):
        registry.register("tiny-dash", tiny_llama, kind="full")
    with running_server(serve_metrics_app()) as serve_url:
        previous = os.environ.get(SERVE_URL_ENV)
        os.environ[SERVE_URL_ENV] = serve_url
        try:
            app = create_app(jobs, api_key=KEY, admin_api_key=ADMIN)
        finally:
            os.environ.pop(SERVE_URL_ENV) if previous is None else os.environ.update(
                {SERVE_URL_ENV: previous}
            )
        with running_server(app) as url:
            yield url


@pytest.fixture
def page(chromium: Any, site: str, screenshot: Any) -> Iterator[Any]:
    """A fresh page whose every request is checked: only `site`'s host may be asked; anything else
    is aborted and fails the test, as does a script error. Its last state is saved as `final`."""
    context = chromium.new_context(viewport={"width": 1100, "height": 900})
    elsewhere: list[str] = []

    def only_local(route: Any) -> None:
        if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto(f"{site}/dashboard")
    yield page
    screenshot(page, "final")
    context.close()
    assert script_errors == []
    assert elsewhere == [], f"the page asked the internet: {elsewhere}"
    assert requested and all(url.startswith(site) for url in requested), requested


def use_key(page: Any, key: str) -> None:
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")


def test_the_loss_curve_grows_while_the_job_trains(page, jobs, tiny_llama, tmp_path, screenshot):  # noqa: F811
    use_key(page, KEY)
    page.wait_for_selector("text=No jobs yet")
    spec = make_job(tiny_llama, tmp_path / "out", max_steps=120, save_steps=20, cluster={"num_workers": 1})
    job = jobs.submit(spec, name="dash")
    page.click(f"a.job-link:has-text('{job.id}')", timeout=WAIT_MS)
    page.wait_for_function(f"location.hash === '#/jobs/{job.id}'")
    try:
        page.wait_for_function(
            "document.querySelector('#loss-chart')?.dataset.points > 0", timeout=START_MS, polling=200
        )
        first = int(page.get_attribute("#loss-chart", "data-points"))
        page.wait_for_function(
            f"document.querySelector('#loss-chart')?.dataset.points > {first}", timeout=WAIT_MS, polling=200
        )
    except PlaywrightTimeout:
        logs = "".join(path.read_text()[-3000:] for path in jobs.log_paths(job.id) if path.is_file())
        raise AssertionError(f"{job.id} ({jobs.get(job.id).status}): no growing curve\n{logs}") from None
    assert "training" in page.locator("#timeline-table").inner_text()
    page.wait_for_selector("#checkpoints-table", timeout=WAIT_MS)
    assert "valid" in page.locator("#checkpoints-table").inner_text()
    names = page.locator("#checkpoints-table td:nth-child(2)").all_inner_texts()
    assert names and len(names) == len(set(names)), names  # each bundle once
    page.wait_for_function("document.querySelector('#log')?.textContent.length > 0", timeout=WAIT_MS)
    assert page.locator("#loss-chart canvas").count() == 1
    screenshot(page, "job")
    page.click("#nav-jobs")
    row = page.locator(f"#jobs-table tr[data-job='{job.id}']")
    assert "training" in row.inner_text() and "/ 120" in row.inner_text()
    screenshot(page, "jobs")


def wait_production(page: Any, version: str) -> None:
    selector = "section[data-model='tiny-dash'] .alias-version[data-alias='production']"
    page.wait_for_function(f"document.querySelector(\"{selector}\")?.textContent === '{version}'")


def test_promote_and_roll_back_with_the_buttons(page, screenshot):
    page.goto(page.url.split("#")[0] + "#/registry")
    use_key(page, KEY)  # a reader sees the registry but may not move an alias
    model = page.locator("section[data-model='tiny-dash']")
    model.locator("button.promote[data-version='v0001'][data-alias='production']").click()
    page.wait_for_selector("#error:has-text('401')")
    use_key(page, ADMIN)
    production = model.locator(".alias-version[data-alias='production']")
    model.locator("button.promote[data-version='v0001'][data-alias='production']").click()
    wait_production(page, "v0001")
    model.locator("button.promote[data-version='v0002'][data-alias='production']").click()
    wait_production(page, "v0002")
    screenshot(page, "promoted")
    model.locator("button.rollback[data-alias='production']").click()
    wait_production(page, "v0001")
    assert production.inner_text() == "v0001"
    history = model.locator("table.history").inner_text()
    assert history.count("promote") == 2 and history.count("rollback") == 1
    screenshot(page, "rolled-back")

    # canary: v0002 at 25% of the traffic, shown beside production's 75%, then rolled back to 0%
    model.locator("button.promote[data-version='v0002'][data-alias='canary']").click()
    canary_weight = "section[data-model='tiny-dash'] .traffic-weight[data-alias='canary']"
    page.wait_for_function(f"document.querySelector(\"{canary_weight}\")?.textContent === '0%'")
    model.locator("input.canary-weight-input").fill("25")
    model.locator("button.set-canary-weight").click()
    page.wait_for_function(f"document.querySelector(\"{canary_weight}\")?.textContent === '25%'")
    assert model.locator(".traffic-weight[data-alias='production']").inner_text() == "75%"
    assert "0% → 25%" in model.locator("table.history").inner_text()
    screenshot(page, "canary")
    model.locator("button.rollback[data-alias='canary']").click()
    page.wait_for_function(f"document.querySelector(\"{canary_weight}\")?.textContent === '0%'")
    assert model.locator(".traffic-weight[data-alias='production']").inner_text() == "100%"


def test_the_serving_page_shows_the_apps_figures(page, screenshot):
    page.goto(page.url.split("#")[0] + "#/serving")
    use_key(page, KEY)
    page.wait_for_selector("#serving-table", timeout=WAIT_MS)
    figures = page.locator("#serving-table").inner_text()
    for expected in (
        "engine replicas\t2",
        "KV cache usage\t0.5",
        "prefix cache hit rate\t0.4",
        "TTFT (s)\t0.25",
    ):
        assert expected in figures, figures
    page.wait_for_function(  # requests/s needs two scrapes
        "!document.querySelector('#serving-table')?.innerText.includes('requests/s\\t–')", timeout=WAIT_MS
    )
    assert page.locator("#replicas-table").inner_text().count("v2") == 2
    screenshot(page, "serving")


def test_the_editor_marks_a_bad_key_at_its_line_then_submits(page, jobs, tiny_llama, tmp_path, screenshot):  # noqa: F811
    page.goto(page.url.split("#")[0] + "#/submit")
    use_key(page, ADMIN)
    text = (
        f"model_name_or_path: {tiny_llama}\ndataset: demo_tasks\n"
        f"dataset_dir: {Path(__file__).parents[2] / 'examples' / 'data'}\n"
        f"lerning_rate: 0.01\noutput_dir: {tmp_path / 'submitted'}\nmax_steps: 2\n"
    )
    page.fill("#spec-yaml", text)
    page.wait_for_selector("#problems li", timeout=WAIT_MS)
    assert page.locator("#problems li").inner_text().startswith("line 4: lerning_rate: unknown key")
    assert page.locator("#gutter .bad").inner_text() == "4"
    screenshot(page, "editor-error")
    page.fill("#spec-yaml", text.replace("lerning", "learning"))
    page.wait_for_selector("#submit-status:has-text('valid')", timeout=WAIT_MS)
    assert page.locator("#gutter .bad").count() == 0
    page.click("#submit")
    page.wait_for_selector("#job-summary", timeout=WAIT_MS)
    job_id = page.url.rsplit("/", 1)[1]
    assert jobs.get(job_id).spec_yaml and "submitted" in jobs.get(job_id).spec_yaml
    jobs.cancel(job_id)  # the submission is what this test checks; its training is the first test's
    screenshot(page, "submitted")
