"""`clusterft registry ...` handlers, driven through argparse exactly as the CLI will wire them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from clusterft.cli.registry import add_registry_commands, format_table
from clusterft.registry.registry import IntegrityError, Registry, RegistryError
from tests.registry.test_registry import make_adapter


def run(root: Path, *argv: str) -> int:
    """Parse like `clusterft` does (top-level subparsers + `registry` group) and run the handler."""
    parser = argparse.ArgumentParser(prog="clusterft")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["registry", "--registry", str(root), *argv])
    return args.handler(args)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    registry = Registry(tmp_path / "registry", clock=lambda: 1_795_000_000.0)
    for seed in range(2):
        registry.register(
            "demo",
            make_adapter(tmp_path / f"a{seed}", seed),
            kind="full",
            job_id=f"job-{seed}",
            eval_results={"exact_match": 0.75 + seed / 10, "loss": 0.123456},
        )
    registry.promote("demo", "v1")
    return registry.root


def test_format_table_aligns_and_marks_empty_cells() -> None:
    assert format_table(["A", "LONGER"], [["xyz", None], ["", 1]]) == "A    LONGER\nxyz  -\n-    1"


def test_list_models_and_versions(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "list") == 0
    assert capsys.readouterr().out.splitlines() == [
        "NAME  VERSIONS  LATEST  PRODUCTION  CANARY",
        "demo  2         v0002   v0001       -",
    ]
    assert run(root, "list", "demo") == 0
    assert capsys.readouterr().out.splitlines() == [
        "VERSION  KIND  CREATED                    JOB    ALIASES     EVAL",
        "v0001    full  2026-11-18T11:06:40+00:00  job-0  production  exact_match=0.75 loss=0.1235",
        "v0002    full  2026-11-18T11:06:40+00:00  job-1  -           exact_match=0.85 loss=0.1235",
    ]


def test_list_json(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(root, "list", "--json")
    assert json.loads(capsys.readouterr().out) == [
        {"name": "demo", "versions": 2, "latest": "v0002", "production": "v0001", "canary": None}
    ]
    run(root, "list", "demo", "--json")
    records = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["aliases"], r["job_id"]) for r in records] == [
        ("v0001", ["production"], "job-0"),
        ("v0002", [], "job-1"),
    ]
    assert set(records[0]["files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "extra/tokenizer.json",
    }


def test_list_empty_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(tmp_path / "none", "list")
    assert capsys.readouterr().out == f"no models registered in {tmp_path / 'none'}\n"


def test_show_defaults_to_production_and_verifies_on_request(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(root, "show", "demo", "--verify") == 0
    out = capsys.readouterr().out
    assert "version      v0001" in out and "aliases      production" in out
    assert "adapter_model.safetensors" in out
    assert out.endswith("verified: all 3 files match the manifest\n")
    run(root, "show", "demo", "2", "--json")
    record = json.loads(capsys.readouterr().out)
    assert (record["version"], record["path"]) == ("v0002", str(root / "demo" / "v0002"))

    (root / "demo" / "v0001" / "stray.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"stray\.bin: added after registration"):
        run(root, "show", "demo", "--verify")


def test_promote_rollback_delete(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "promote", "demo", "v2") == 0
    assert capsys.readouterr().out == "production of demo: v0001 -> v0002\n"
    run(root, "promote", "demo", "v2")
    assert capsys.readouterr().out == "production of demo already points at v0002; nothing changed\n"
    run(root, "promote", "demo", "1", "--alias", "canary")
    assert capsys.readouterr().out == "canary of demo: none -> v0001\n"
    with pytest.raises(RegistryError, match="is the canary version"):
        run(root, "delete", "demo", "v1")
    assert run(root, "rollback", "demo") == 0
    assert capsys.readouterr().out == "production of demo rolled back: v0002 -> v0001\n"
    assert run(root, "delete", "demo", "v2") == 0
    assert capsys.readouterr().out == f"deleted demo v0002 ({root / 'demo' / 'v0002'})\n"


def test_alias_choices_are_enforced_by_argparse(root: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        run(root, "promote", "demo", "v1", "--alias", "staging")
    assert caught.value.code == 2


def test_registry_root_defaults_to_the_environment(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLUSTERFT_REGISTRY", str(root))
    parser = argparse.ArgumentParser(prog="clusterft")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["registry", "list"])
    assert args.registry == str(root)
    args.handler(args)
    assert "demo  2" in capsys.readouterr().out
