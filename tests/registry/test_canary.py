"""Canary traffic in the registry: a weighted split recorded in the alias history, rolled back like a
promotion, validated with errors that name the fix; sticky, weight-proportional routing of sessions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterft.cli import main as cli
from clusterft.errors import UserError
from clusterft.registry.registry import Registry, RegistryError
from clusterft.registry.traffic import TrafficSplit, bucket
from tests.registry.test_registry import base, register, registry  # noqa: F401  (fixtures)


@pytest.fixture
def three(registry: Registry, tmp_path: Path, base: Path) -> Registry:  # noqa: F811
    for seed in range(3):
        register(registry, tmp_path, base, seed)
    registry.promote("demo", "v1")
    return registry


def test_canary_split_is_recorded_and_rolled_back_step_by_step(three: Registry) -> None:
    assert three.set_canary("demo", "v2", 10) is not None
    split = three.traffic("demo")
    assert (split.production, split.canary, split.canary_weight) == ("v0001", "v0002", 10)
    assert split.weights == {"v0001": 90, "v0002": 10}
    assert three.set_canary("demo", "v2", 10) is None  # a retried call changes nothing
    three.set_canary_weight("demo", 50)
    three.set_canary("demo", "v3", 25)
    history = [
        (c.alias, c.action, c.version, c.weight, c.previous_weight) for c in three.alias_history("demo")
    ]
    assert history[1:] == [
        ("canary", "promote", "v0002", 10, 0),
        ("canary", "weight", "v0002", 50, 10),
        ("canary", "promote", "v0003", 25, 50),
    ]
    back = three.rollback("demo", "canary")
    assert (back.version, back.weight) == ("v0002", 50)
    back = three.rollback("demo", "canary")
    assert (back.version, back.weight) == ("v0002", 10)
    assert three.traffic("demo").weights == {"v0001": 90, "v0002": 10}
    assert three.aliases("demo") == {"production": "v0001", "canary": "v0002"}


def test_abort_keeps_the_canary_set_with_no_traffic_and_the_reason(three: Registry) -> None:
    three.set_canary("demo", "v2", 20)
    change = three.abort_canary("demo", "error rate 0.4 > 0.05 over 20 requests")
    assert change is not None and change.reason == "error rate 0.4 > 0.05 over 20 requests"
    assert three.abort_canary("demo") is None
    split = three.traffic("demo")
    assert (split.canary, split.canary_weight, split.active) == ("v0002", 0, False)
    assert split.weights == {"v0001": 100}
    assert three.rollback("demo", "canary").weight == 20  # an abort is undone like any move


def test_promote_canary_moves_production_and_ends_the_split_in_one_write(three: Registry) -> None:
    three.set_canary("demo", "v3", 30)
    change = three.promote_canary("demo")
    assert (change.alias, change.previous, change.version) == ("production", "v0001", "v0003")
    split = three.traffic("demo")
    assert (split.production, split.canary_weight, split.weights) == ("v0003", 0, {"v0003": 100})
    assert three.alias_history("demo")[-1].reason == "promoted to production"
    assert three.rollback("demo").version == "v0001"  # production's own rollback still works


@pytest.mark.parametrize("weight", [-1, 101, 2.5, True, "10"])
def test_bad_weights_are_refused_naming_the_range(three: Registry, weight: object) -> None:
    with pytest.raises(UserError, match="whole percentage from 0 to 100"):
        three.set_canary("demo", "v2", weight)  # type: ignore[arg-type]
    assert three.traffic("demo").canary is None


def test_a_split_needs_existing_versions_and_a_production(
    registry: Registry,  # noqa: F811
    tmp_path: Path,
    base: Path,  # noqa: F811
) -> None:
    register(registry, tmp_path, base)
    with pytest.raises(RegistryError, match="no production version to split traffic with; promote one"):
        registry.set_canary("demo", "v1", 10)
    # The fix each error names is a command the CLI has (`registry canary NAME VERSION --weight W`).
    with pytest.raises(
        RegistryError, match="no canary version; set one first: `clusterft registry canary demo V"
    ):
        registry.set_canary_weight("demo", 10)
    with pytest.raises(
        RegistryError, match="no canary version to promote; set one first: `clusterft registry canary demo V"
    ):
        registry.promote_canary("demo")
    registry.promote("demo", "v1")
    with pytest.raises(RegistryError, match="has no version v0007"):
        registry.set_canary("demo", "v7", 10)


def test_aliases_files_from_before_weights_still_read_and_roll_back(three: Registry) -> None:
    path = three.root / "demo" / "aliases.json"
    data = json.loads(path.read_text())
    del data["weights"]
    for entry in data["history"]:
        for key in ("weight", "previous_weight", "reason"):
            entry.pop(key)
    path.write_text(json.dumps(data))
    assert three.traffic("demo").weights == {"v0001": 100}
    three.promote("demo", "v2", "canary")
    assert three.alias_history("demo")[0].weight is None
    three.set_canary_weight("demo", 5)
    assert three.rollback("demo", "canary").weight == 0


def test_cli_sets_shows_and_aborts_the_split(three: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    root = ["registry", "--registry", str(three.root)]
    assert cli([*root, "canary", "demo", "v2", "--weight", "10"]) == 0
    assert "production v0001 90%, canary v0002 10%" in capsys.readouterr().out
    assert cli([*root, "canary-weight", "demo", "40"]) == 0
    capsys.readouterr()
    assert cli([*root, "traffic", "demo"]) == 0
    assert "production v0001 60%, canary v0002 40%" in capsys.readouterr().out
    assert cli([*root, "traffic", "demo", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["weights"] == {"v0001": 60, "v0002": 40}
    assert cli([*root, "canary-abort", "demo", "--reason", "manual"]) == 0
    assert "canary v0002 0%" in capsys.readouterr().out
    assert cli([*root, "canary-weight", "demo", "150"]) == 2
    assert "whole percentage from 0 to 100" in capsys.readouterr().err
    assert cli([*root, "canary-promote", "demo"]) == 0
    assert "production v0002 100%" in capsys.readouterr().out
    # Rolling the canary alias back restores its previous (version, weight): v0002 at 0 % (aborted).
    assert cli([*root, "rollback", "demo", "--alias", "canary"]) == 0
    assert three.traffic("demo").canary == "v0002"


def test_sessions_are_sticky_and_split_by_weight() -> None:
    """400 session ids at weight 10: the canary count is Binomial(400, 0.1) if the hash buckets are
    uniform (mean 40, sd 6); 40 +- 4 sd = [16, 64] fails a uniform hash with probability < 1e-4, so
    a count outside it means the routing is biased. The hash is deterministic, so this never flakes."""
    split = TrafficSplit("demo", "v0001", "v0002", 10)
    sessions = [f"session-{i}" for i in range(400)]
    routes = [split.route(s) for s in sessions]
    assert 16 <= routes.count("canary") <= 64
    assert routes == [split.route(s) for s in sessions]  # sticky: same session, same version
    wider = TrafficSplit("demo", "v0001", "v0002", 30)
    assert all(wider.route(s) == "canary" for s, r in zip(sessions, routes, strict=True) if r == "canary")
    assert 120 - 4 * 9.2 <= [wider.route(s) for s in sessions].count("canary") <= 120 + 4 * 9.2
    assert TrafficSplit("demo", "v0001", "v0002", 0).route("session-1") == "production"
    assert 0 <= bucket("demo", "a") < 100
