"""The admin record's logic with real engines and followers, without Serve or Ray: two replicas
converge on the record's adapters, a replica starting later gets them too and re-resolves the alias
of an earlier reload (a no-op), bad paths are reported, conflicts, reserved names and paths outside
the adapter roots refused, and a replica that stops syncing is no longer waited for."""

from __future__ import annotations

import asyncio
import os

import pytest

from clusterft.serve.admin import STALE_AFTER_S, AdminState, Reconciler
from clusterft.serve.engine_deployment import engine_loop
from clusterft.serve.errors import APIError
from clusterft.serve.follower import ModelFollower
from clusterft.serve.model_source import resolve
from tests.serve.conftest import make_spec


def replica(spec) -> Reconciler:
    follower = ModelFollower(spec, lambda ref: resolve(spec), lambda model: engine_loop(spec, model))
    return Reconciler(follower)


async def sync(state: AdminState, name: str, r: Reconciler, now: float) -> None:
    """One sync of replica `name`, applied at once."""
    desired = state.sync(name, r.applied, r.errors, r.reload_result, now)
    if desired is not None:
        await r.apply(desired)
    state.sync(name, r.applied, r.errors, r.reload_result, now)  # report what was applied


def served(r: Reconciler) -> dict[str, str]:
    return r.follower.adapters


def test_replicas_converge_on_the_record(tiny_llama, tiny_adapter):
    spec = make_spec(tiny_llama)
    root = str(tiny_adapter.parent)
    state = AdminState("tiny", {}, adapter_roots=(root,))
    a, b = replica(spec), replica(spec)

    async def main() -> None:
        for name, r in (("a", a), ("b", b)):
            await sync(state, name, r, now=0)
        assert (a.applied, b.applied) == (0, 0)

        added = state.add_adapter("ada", str(tiny_adapter))
        assert state.progress(added, now=0)["pending"] == ["a", "b"]
        await sync(state, "a", a, now=1)
        assert state.progress(added, now=1)["pending"] == ["b"]
        await sync(state, "b", b, now=1)
        assert state.progress(added, now=1) == {
            "num_live": 2,
            "pending": [],
            "errors": [],
            "reload_results": {"a": None, "b": None},  # neither has run a reload
        }
        assert served(a) == served(b) == {"ada": str(tiny_adapter)}

        reloaded = state.reload(None)
        await sync(state, "a", a, now=2)
        assert a.reload_result["error"] is None and not a.reload_result["switched"]

        c = replica(spec)  # a replacement replica, started after both changes
        await sync(state, "c", c, now=2)
        assert served(c) == {"ada": str(tiny_adapter)} and c.applied == reloaded
        assert c.reload_result["version"] == c.follower.version  # run: the alias it already serves

        bad = state.add_adapter("bad", os.path.join(root, "no-such-adapter"))
        await sync(state, "a", a, now=3)
        assert "adapter_config.json" in state.progress(bad, now=3)["errors"][0]
        assert "bad" not in served(a)

        removed = state.remove_adapter("ada")
        for name, r in (("a", a), ("c", c)):
            await sync(state, name, r, now=3 + STALE_AFTER_S)
        # b stopped syncing at t=1 (a dead replica): nobody waits for it any more
        progress = state.progress(removed, now=3 + STALE_AFTER_S)
        assert progress["num_live"] == 2 and progress["pending"] == []
        assert served(a) == served(c) == {}

    asyncio.run(main())


def test_record_refuses_conflicts_and_unknown_adapters():
    state = AdminState("tiny", {"spec-lora": "/a"})
    with pytest.raises(APIError, match="already exists") as conflict:
        state.add_adapter("spec-lora", "/b")
    assert conflict.value.status == 409
    with pytest.raises(APIError, match="already exists"):
        state.add_adapter("tiny", "/b")  # the base model's name
    with pytest.raises(APIError, match="does not exist") as missing:
        state.remove_adapter("nope")
    assert missing.value.status == 404 and state.generation == 0


def test_record_is_idle_once_no_replica_syncs():
    from clusterft.serve.admin import IDLE_EXIT_S

    state = AdminState("tiny", {})
    state.sync("a", -1, [], None, now=state.created + 10)
    assert not state.idle(state.created + 10 + IDLE_EXIT_S)
    assert state.idle(state.created + 11 + IDLE_EXIT_S)


def test_engine_stats_are_those_the_live_replicas_sent_last():
    state = AdminState("tiny", {})
    state.sync("a", 0, [], None, now=0, stats={"num_running": 1})
    state.sync("b", 0, [], None, now=0)  # no stats yet (its engine is being rebuilt)
    state.sync("c", 0, [], None, now=1, stats={"num_running": 2})
    state.sync("c", 0, [], None, now=2, stats={"num_running": 3})
    assert state.engine_stats(now=2) == {"a": {"num_running": 1}, "c": {"num_running": 3}}
    assert state.engine_stats(now=2 + STALE_AFTER_S) == {"c": {"num_running": 3}}  # a stopped syncing


def test_record_refuses_reserved_names():
    """`tiny@v0002` is the internal adapter of a registered adapter version: base-model requests use
    it, so an admin call must not be able to replace it."""
    state = AdminState("tiny", {}, adapter_roots=("/adapters",))
    for name in ("tiny@v0002", "x@y", " "):
        with pytest.raises(APIError) as refused:
            state.add_adapter(name, "/adapters/a")
        assert (refused.value.status, refused.value.param) == (400, "name")
    assert state.adapters == {} and state.generation == 0


def test_record_reads_runtime_adapters_only_from_under_the_adapter_roots(tmp_path):
    root, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    (root / "team").mkdir(parents=True)
    outside.mkdir()
    (root / "team" / "link").symlink_to(outside)  # inside by name, outside once resolved

    closed = AdminState("tiny", {})  # no roots (the default): no runtime adapters at all
    with pytest.raises(APIError, match=r"runtime adapters are off.*--adapter-root DIR") as off:
        closed.add_adapter("a", str(root / "team"))
    assert off.value.status == 403

    state = AdminState("tiny", {}, adapter_roots=(str(root),))
    for path, status, message in [
        (str(outside), 403, "outside the adapter roots"),
        (f"{root}/../elsewhere", 403, "outside the adapter roots"),
        (str(root / "team" / "link"), 403, "outside the adapter roots"),
        (f"{root}-sibling/a", 403, "outside the adapter roots"),  # a shared prefix is not a parent
        ("adapters/team", 400, "is relative"),
    ]:
        with pytest.raises(APIError, match=message) as refused:
            state.add_adapter("a", path)
        assert (refused.value.status, refused.value.param) == (status, "path"), path
    assert state.generation == 0
    assert state.add_adapter("a", str(root / "team")) == 1
    assert state.add_adapter("b", str(root)) == 2  # the root itself


def test_an_apply_under_way_when_the_record_is_lost_reports_nothing_to_the_new_record(
    tiny_llama, tiny_adapter
):
    """The record (a detached actor) can die while a replica is running a reload of its state; the
    replica then starts over with a new record (forget_record). The old apply must not write its
    generation back when it ends: the new record would take that generation as applied and never
    send the replica its own changes up to it."""
    spec = make_spec(tiny_llama)
    old = AdminState("tiny", {}, adapter_roots=(str(tiny_adapter.parent),))
    r = replica(spec)

    async def main() -> None:
        await sync(old, "a", r, now=0)
        old.reload(None)
        for _ in range(3):  # the old record's generation runs ahead of the new one's
            old.add_adapter("x", str(tiny_adapter))
            old.remove_adapter("x")
        desired = old.sync("a", r.applied, r.errors, r.reload_result, now=1)
        applying = asyncio.get_running_loop().create_task(r.apply(desired))
        await asyncio.sleep(0)  # the reload is under way (resolving the version in a thread)
        r.forget_record()  # the record is gone; a new one starts from the spec
        await applying
        assert (r.applied, r.reload_result) == (-1, None)

        new = AdminState("tiny", {}, adapter_roots=(str(tiny_adapter.parent),))
        added = new.add_adapter("ada", str(tiny_adapter))
        await sync(new, "a", r, now=2)
        assert r.applied == added and served(r) == {"ada": str(tiny_adapter)}

    asyncio.run(main())
