"""POST /v1/admin/reload's answer names the version the replicas serve after it, for every order of a
replica's first sync, the reload and an alias move, on real followers of a real registry on disk (real
engines, no Ray): a replica whose first sync comes after a rollback's reload runs it (it answered with
the version it served before the rollback, and kept serving it until its alias poll); replicas that end
on different versions, or that did not run a pinned reload, are a 409 naming them; a replica whose
record was lost runs the new record's reloads."""

from __future__ import annotations

import asyncio
import time

import pytest

from clusterft.hf.tiny import make_tiny_model
from clusterft.registry.registry import Registry
from clusterft.serve.admin import AdminState, Reconciler, reload_answer
from clusterft.serve.engine_deployment import engine_loop
from clusterft.serve.errors import APIError
from clusterft.serve.follower import ModelFollower
from clusterft.serve.model_source import resolve_version
from clusterft.serve.spec import RegistrySource, ServeSpec
from tests.serve.conftest import ENGINE


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("reload")
    registry = Registry(root / "registry")
    for seed in (0, 1):
        registry.register(
            "quick", make_tiny_model(root / f"seed{seed}", "llama", "tiny", seed=seed), kind="full"
        )
    return registry


def replica(registry: Registry, name: str) -> Reconciler:
    """An engine replica's follower of `production` (no alias poll: the test moves it) and reconciler."""
    source = RegistrySource(root=str(registry.root), model_name="quick")
    spec = ServeSpec(registry=source, engine=ENGINE)
    follower = ModelFollower(
        spec, lambda ref: resolve_version(source, ref), lambda model: engine_loop(spec, model), ("test", name)
    )
    return Reconciler(follower)


async def sync(state: AdminState, name: str, r: Reconciler) -> None:
    """One sync of replica `name`, applied at once, and the report of what it applied."""
    desired = state.sync(name, r.applied, r.errors, r.reload_result, now=0)
    if desired is not None:
        await r.apply(desired)
    state.sync(name, r.applied, r.errors, r.reload_result, now=0)


def answer(state: AdminState, generation: int) -> dict:
    progress = state.progress(generation, now=0)
    assert progress["num_live"] and not progress["pending"], progress
    return reload_answer(progress)


def close(*replicas: Reconciler) -> None:
    for r in replicas:
        r.follower.close()


def set_production(registry: Registry, version: str) -> None:
    if registry.aliases("quick")["production"] != version:
        registry.promote("quick", version)


def test_a_replica_first_synced_after_a_rollback_reload_answers_and_serves_the_rolled_back_version(
    registry: Registry,
) -> None:
    """The flake of test_promote_and_rollback_under_load_lose_no_request: the replica started on v2,
    the record (started lazily, out-of-order calls) took the reload before the replica's first sync."""
    set_production(registry, "v1")
    set_production(registry, "v2")

    async def scenario() -> None:
        a = replica(registry, "a")
        assert a.follower.version == "v0002"
        registry.rollback("quick")
        state = AdminState("quick", {})
        reloaded = state.reload(None)
        await sync(state, "a", a)  # its first sync
        assert answer(state, reloaded)["version"] == "v0001" == registry.aliases("quick")["production"]
        assert a.reload_result is not None and a.reload_result["switched"]
        assert a.follower.version == "v0001"  # switched by the reload, not left to the alias poll
        close(a)

    asyncio.run(scenario())


def test_replicas_that_end_a_reload_on_different_versions_are_a_409_naming_them(registry: Registry) -> None:
    set_production(registry, "v1")

    async def scenario() -> None:
        a, b = replica(registry, "a"), replica(registry, "b")
        state = AdminState("quick", {})
        for name, r in (("a", a), ("b", b)):
            await sync(state, name, r)
        registry.promote("quick", "v2")
        reloaded = state.reload(None)
        await sync(state, "a", a)  # a reloads: v2
        registry.rollback("quick")  # the alias moves back before b reloads: b stays on v1
        await sync(state, "b", b)
        with pytest.raises(APIError) as disagree:
            answer(state, reloaded)
        assert (disagree.value.status, disagree.value.code) == (409, "replicas_disagree")
        assert "v0002 on ['a']; v0001 on ['b']" in disagree.value.message
        assert (a.follower.version, b.follower.version) == ("v0002", "v0001")

        again = state.reload(None)  # what the 409 says to do: both resolve v1 now
        for name, r in (("a", a), ("b", b)):
            await sync(state, name, r)
        result = answer(state, again)
        assert (result["version"], result["num_replicas"]) == ("v0001", 2)
        close(a, b)

    asyncio.run(scenario())


def test_a_pinned_reload_runs_on_replicas_started_before_it_and_names_those_started_after(
    registry: Registry,
) -> None:
    set_production(registry, "v2")

    async def scenario() -> None:
        a = replica(registry, "a")  # started before the reload, first synced after it
        state = AdminState("quick", {})
        pinned = state.reload("v1")
        await sync(state, "a", a)
        assert answer(state, pinned)["version"] == "v0001" == a.follower.version

        b = replica(registry, "b")  # started after the pin: serves the alias and does not run it
        await sync(state, "b", b)
        assert b.follower.version == "v0002" and b.reload_result is None
        with pytest.raises(APIError) as skipped:
            answer(state, pinned)
        assert (skipped.value.status, skipped.value.code) == (409, "replicas_disagree")
        assert "replicas ['b'] started after this reload was issued" in skipped.value.message
        close(a, b)

    asyncio.run(scenario())


def test_a_replica_whose_record_was_lost_runs_the_new_records_reloads(registry: Registry) -> None:
    set_production(registry, "v1")

    async def scenario() -> None:
        a = replica(registry, "a")
        old = AdminState("quick", {})
        await sync(old, "a", a)
        old.reload(None)
        old.reload(None)
        await sync(old, "a", a)  # ran the old record's reload generation 2 (no switch)

        new = AdminState("quick", {})  # the old record died; the replica starts one anew
        a.forget_record()
        await sync(new, "a", a)
        registry.promote("quick", "v2")
        first = new.reload(None)  # generation 1 of the new record: not "seen" before
        await sync(new, "a", a)
        assert answer(new, first)["version"] == "v0002" == a.follower.version
        close(a)

    asyncio.run(scenario())


def test_a_pinned_version_stays_served_until_the_alias_moves(registry: Registry) -> None:
    """A reload to a version (POST /v1/admin/reload {"version"}) is not undone by the replica's
    alias poll (it was, within one poll interval, while the alias pointed elsewhere); the replica
    follows the alias again when the alias moves, or with a reload of the alias."""
    set_production(registry, "v2")
    source = RegistrySource(root=str(registry.root), model_name="quick", poll_interval_s=0.05)
    spec = ServeSpec(registry=source, engine=ENGINE)

    async def until(follower: ModelFollower, version: str) -> None:
        deadline = time.monotonic() + 60
        while follower.version != version:
            assert time.monotonic() < deadline, f"still serving {follower.version}, not {version}"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        follower = ModelFollower(
            spec, lambda ref: resolve_version(source, ref), lambda m: engine_loop(spec, m), ("test", "pin")
        )
        watching = asyncio.get_running_loop().create_task(follower.watch())
        try:
            assert (await follower.reload("v1"))["version"] == "v0001"
            await asyncio.sleep(0.5)  # ten polls of an alias that still points at v2
            assert follower.version == "v0001"
            assert (await follower.reload(None))["version"] == "v0002"  # follow the alias again

            await follower.reload("v1")
            registry.rollback("quick")  # the alias moves to v1: the version served already
            registry.promote("quick", "v2")  # and on to v2, which the poll follows
            await until(follower, "v0002")
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            follower.close()

    asyncio.run(scenario())
