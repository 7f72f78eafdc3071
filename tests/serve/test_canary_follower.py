"""The engine replica's side of canary traffic, on real engines of real registered versions (no Ray):
the canary is loaded beside production and requests are split by session; a canary whose requests
fail is rolled back automatically, through the registry, and production then serves every session
with no failed request; promoting a healthy canary hands its loaded engine to production."""

from __future__ import annotations

import asyncio
import time

import pytest

from clusterft.engine import SamplingParams
from clusterft.hf.tiny import make_tiny_model
from clusterft.registry.registry import Registry
from clusterft.serve.engine_deployment import engine_loop
from clusterft.serve.follower import ModelFollower
from clusterft.serve.model_source import ModelVersion, resolve_version
from clusterft.serve.spec import CanaryPolicy, RegistrySource, ServeSpec
from tests.serve.conftest import ENGINE

PARAMS = SamplingParams(temperature=0, max_tokens=2)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("canary")
    registry = Registry(root / "registry")
    for seed in (0, 1):
        model = make_tiny_model(root / f"seed{seed}", "llama", "tiny", seed=seed)
        registry.register("quick", model, kind="full")
    return registry


def make_follower(registry: Registry, broken_canary: bool) -> ModelFollower:
    """A replica following production. With `broken_canary`, v0002's engine admits no request
    (max_queued_requests 0): each of its requests is its real EngineLoop's 503 overload answer."""
    policy = CanaryPolicy(max_error_rate=0.2, min_requests=5)
    source = RegistrySource(root=str(registry.root), model_name="quick", canary=policy)
    spec = ServeSpec(registry=source, engine=ENGINE)
    refusing = spec.model_copy(update={"max_queued_requests": 0})

    def make_loop(model: ModelVersion):
        return engine_loop(refusing if broken_canary and model.version == "v0002" else spec, model)

    return ModelFollower(spec, lambda ref: resolve_version(source, ref), make_loop, ("test", "r1"))


async def ask(follower: ModelFollower, session: str, n: int) -> tuple[str, str, int | None]:
    """(alias, version, error status or None) of one request of `session`."""
    chunks = [
        c async for c in follower.generate(f"{session}-{n}", [5, 6, 7], PARAMS, "quick", 0, None, session)
    ]
    error = chunks[-1].get("error")
    return chunks[0]["model_alias"], chunks[0]["model_version"], error["status"] if error else None


def reset(registry: Registry) -> None:
    registry.promote("quick", "v1")
    registry.set_canary("quick", "v2", 50)


def test_a_failing_canary_is_rolled_back_and_production_serves_every_session(registry: Registry) -> None:
    reset(registry)

    async def scenario() -> None:
        follower = make_follower(registry, broken_canary=True)
        await follower.follow_split(registry.traffic("quick"))
        assert follower.canary_status()["version"] == "v0002"
        sessions = [f"s{i}" for i in range(24)]
        before = [await ask(follower, s, 0) for s in sessions]
        canary_failures = [r for r in before if r[0] == "canary"]
        # the canary's first 5 requests fail (5 >= min_requests, rate 1.0 > 0.2): rolled back after them
        assert len(canary_failures) == 5 and {r[1:] for r in canary_failures} == {("v0002", 503)}
        assert all(r[1:] == ("v0001", None) for r in before if r[0] == "production")
        assert follower.canary is None and follower.canary_status()["num_rollbacks"] == 1
        after = [await ask(follower, s, 1) for s in sessions]
        assert set(after) == {("production", "v0001", None)}  # no request fails after the verdict
        deadline = time.monotonic() + 10
        while registry.traffic("quick").canary_weight != 0:  # the registry write runs in a thread
            assert time.monotonic() < deadline, "the rollback never reached the registry"
            await asyncio.sleep(0.05)
        last = registry.alias_history("quick")[-1]
        assert (last.alias, last.action, last.weight, last.previous_weight) == ("canary", "weight", 0, 50)
        assert (
            last.reason is not None and "error rate 1.000 > max_error_rate 0.2 over 5 requests" in last.reason
        )
        await follower.follow_split(registry.traffic("quick"))  # weight 0 now: stays off
        assert follower.canary is None and (await ask(follower, "s0", 2))[0] == "production"
        follower.close()

    asyncio.run(scenario())


def test_sessions_stick_and_a_promoted_canary_keeps_its_engine(registry: Registry) -> None:
    reset(registry)

    async def scenario() -> None:
        follower = make_follower(registry, broken_canary=False)
        await follower.follow_split(registry.traffic("quick"))
        sessions = [f"user-{i}" for i in range(40)]
        first = [await ask(follower, s, 0) for s in sessions]
        again = [await ask(follower, s, 1) for s in sessions]
        assert first == again and {r[2] for r in first} == {None}
        assert {r[:2] for r in first} == {("production", "v0001"), ("canary", "v0002")}
        assert follower.canary_status()["outcomes"]["canary"]["errors"] == 0
        canary_loop = follower.canary.loop if follower.canary else None
        registry.promote_canary("quick")
        result = await follower.reload()
        assert result["switched"] and follower.current.loop is canary_loop  # no second load
        await follower.follow_split(registry.traffic("quick"))
        assert follower.canary is None
        assert {await ask(follower, s, 2) for s in sessions} == {("production", "v0002", None)}
        follower.close()

    asyncio.run(scenario())
