"""The model registry: immutable, verified versions; aliases with history and rollback; deletes that
never strand an alias; concurrent registrations and alias moves that lose nothing."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from clusterft.cli import main as cli
from clusterft.errors import UserError
from clusterft.hf.lora import merge_adapter
from clusterft.hf.merge_check import MergeCheckReport
from clusterft.hf.tiny import make_tiny_model
from clusterft.registry.manifest import MANIFEST, sha256_file, tree_sha256
from clusterft.registry.merged import stage_merged
from clusterft.registry.registry import IntegrityError, Registry, RegistryError, Version
from tests.hf.helpers import make_trained_adapter


def make_adapter(root: Path, seed: int = 0) -> Path:
    """A small peft-style adapter directory with a nested file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": seed}))
    (root / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4 + bytes([seed]))
    (root / "extra").mkdir(exist_ok=True)
    (root / "extra" / "tokenizer.json").write_text("{}")
    return root


@pytest.fixture
def base(tmp_path: Path) -> Path:
    model = tmp_path / "models" / "tiny-llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(b"\x00" * 512)
    return model


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry", clock=lambda: 1_795_000_000.0)


def register(registry: Registry, tmp_path: Path, base: Path, seed: int = 0, name: str = "demo") -> Version:
    source = make_adapter(tmp_path / f"adapter-{name}-{seed}", seed)
    return registry.register(
        name,
        source,
        kind="adapter",
        base_model=base,
        job_id=f"job-{seed}",
        checkpoint=f"ckpt/{seed}",
        eval_results={"exact_match": 0.5 + seed / 100},
    )


# ---------------------------------------------------------------- register / read


def test_register_copies_files_and_writes_a_complete_manifest(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    version = register(registry, tmp_path, base)
    assert (version.name, version.version, version.number) == ("demo", "v0001", 1)
    assert version.path == registry.root / "demo" / "v0001"
    manifest = json.loads((version.path / MANIFEST).read_text())
    source = tmp_path / "adapter-demo-0"
    assert manifest == {
        "name": "demo",
        "version": "v0001",
        "kind": "adapter",
        "base_model": str(base),
        "base_model_sha256": tree_sha256(base),
        "job_id": "job-0",
        "checkpoint": "ckpt/0",
        "eval": {"exact_match": 0.5},
        "created_at": "2026-11-18T11:06:40+00:00",
        "format": 1,
        "files": {
            rel: {"sha256": sha256_file(source / rel), "size": (source / rel).stat().st_size}
            for rel in ("adapter_config.json", "adapter_model.safetensors", "extra/tokenizer.json")
        },
    }
    for rel in manifest["files"]:
        assert (version.path / rel).read_bytes() == (source / rel).read_bytes()
        assert (version.path / rel).stat().st_mode & 0o222 == 0, "registered files are read-only"
    # Nothing but the version (and the lock) is left in the model directory: no staging leftovers.
    assert sorted(p.name for p in (registry.root / "demo").iterdir()) == [".lock", "v0001"]


def test_versions_are_numbered_and_listed(registry: Registry, tmp_path: Path, base: Path) -> None:
    for seed in range(3):
        register(registry, tmp_path, base, seed)
    register(registry, tmp_path, base, 0, name="other")
    assert registry.models() == ["demo", "other"]
    assert [v.version for v in registry.versions("demo")] == ["v0001", "v0002", "v0003"]
    assert registry.show("demo", "2").manifest.job_id == "job-1"
    assert registry.show("demo", "v2") == registry.show("demo", "v0002")
    assert registry.versions("nothing") == []


def test_base_model_hash_covers_names_and_bytes(base: Path) -> None:
    before = tree_sha256(base)
    (base / "config.json").rename(base / "config2.json")
    assert tree_sha256(base) != before
    (base / "config2.json").rename(base / "config.json")
    assert tree_sha256(base) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "adapter"}, "an adapter needs base_model"),
        ({"kind": "lora"}, "unknown kind 'lora'"),
        ({"kind": "full", "base_model": "/nonexistent"}, "base model /nonexistent does not exist"),
    ],
)
def test_register_refuses_bad_input(registry: Registry, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        registry.register("demo", make_adapter(tmp_path / "a"), **kwargs)
    assert registry.versions("demo") == []


def test_register_refuses_bad_sources_and_names(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="is not a directory"):
        registry.register("demo", tmp_path / "missing", kind="full")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="is empty"):
        registry.register("demo", tmp_path / "empty", kind="full")
    bundle = make_adapter(tmp_path / "bundle")
    (bundle / MANIFEST).write_text("{}")
    with pytest.raises(RegistryError, match="not a checkpoint bundle"):
        registry.register("demo", bundle, kind="full")
    for name in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(RegistryError, match="invalid model name"):
            registry.register(name, make_adapter(tmp_path / "a"), kind="full")


def test_a_version_without_the_merge_check_field_still_loads(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    version = register(registry, tmp_path, base)
    assert "merge_check" not in json.loads((version.path / MANIFEST).read_text())
    assert registry.show("demo", "v1").manifest.merge_check is None


def test_the_verify_hook_sees_the_copied_files_and_can_stop_registration(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    seen: list[Path] = []

    def merge_equivalence(staged: Path) -> None:
        seen.append(staged)
        assert (staged / "adapter_model.safetensors").exists()
        raise UserError("merged logits differ from base+adapter by 0.3 (tolerance 1e-4)")

    with pytest.raises(UserError, match="merged logits differ"):
        registry.register("demo", make_adapter(tmp_path / "a"), kind="full", verify=merge_equivalence)
    assert len(seen) == 1 and not seen[0].exists(), "the staged copy is removed"
    assert registry.versions("demo") == []
    accepted = registry.register("demo", make_adapter(tmp_path / "a"), kind="full", verify=lambda _: None)
    assert accepted.version == "v0001"

    def writes(staged: Path) -> None:
        (staged / "probe_logits.pt").write_bytes(b"0")

    with pytest.raises(RegistryError, match="it must only read them"):
        registry.register("demo", make_adapter(tmp_path / "a"), kind="full", verify=writes)
    assert [v.version for v in registry.versions("demo")] == ["v0001"]


# ---------------------------------------------------------------- merged versions


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, MergeCheckReport]:
    """A real tiny base, a LoRA adapter of it, and their merge staged as the controller does it."""
    root = tmp_path_factory.mktemp("merge")
    base = make_tiny_model(root / "base", "llama", "tiny")
    adapter = make_trained_adapter(base, root / "adapter")
    merged_dir, report = stage_merged(adapter, base, root / "work")
    return base, adapter, merged_dir, report


def test_a_checked_merge_is_registered_with_its_report(
    registry: Registry, merged: tuple[Path, Path, Path, MergeCheckReport], capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter, merged_dir, report = merged
    assert merged_dir.name == "merged" and report.passed
    version = registry.register("demo", merged_dir, kind="merged", merge_check=report.to_dict(), job_id="j")
    manifest = registry.show("demo", "v1").manifest
    assert manifest == version.manifest
    assert (manifest.base_model, manifest.base_model_sha256) == (str(base.resolve()), tree_sha256(base))
    assert manifest.merge_check == {**report.to_dict(), "adapter_sha256": tree_sha256(adapter)}
    assert manifest.merge_check["adapter"] == str(adapter.resolve())
    assert "merge_check.json" in manifest.files
    registry.verify("demo", "v1", check_base=True)
    assert cli(["registry", "--registry", str(registry.root), "show", "demo", "v1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("merge check"))
    assert f"max |diff| {report.max_abs_diff:.3g}" in row and report.dtype in row


def test_an_unchecked_or_failed_merge_is_refused(
    registry: Registry, merged: tuple[Path, Path, Path, MergeCheckReport], tmp_path: Path
) -> None:
    base, _, merged_dir, report = merged
    checked = report.to_dict()
    with pytest.raises(RegistryError, match="a merged version needs a passing merge-equivalence check"):
        registry.register("demo", merged_dir, kind="merged", base_model=base)
    failed = {**checked, "passed": False, "max_abs_diff": 0.75, "rel_diff": 3.4}
    with pytest.raises(
        RegistryError, match=r"failed: max \|diff\| 0.75, 3.4 of the logits' scale, tolerance 0.001"
    ):
        registry.register("demo", merged_dir, kind="merged", merge_check=failed)
    loosened = {**checked, "tolerance": 0.5}
    with pytest.raises(RegistryError, match=r"looser than the float32 default 0\.001"):
        registry.register("demo", merged_dir, kind="merged", merge_check=loosened)
    with pytest.raises(RegistryError, match=r"compared against base model .* not /elsewhere"):
        registry.register("demo", merged_dir, kind="merged", base_model="/elsewhere", merge_check=checked)
    with pytest.raises(
        RegistryError, match="merge_check is the report of a merged version; this one is kind full"
    ):
        registry.register("demo", merged_dir, kind="full", merge_check=checked)
    # The report of one merge does not vouch for other weights.
    other = make_trained_adapter(base, tmp_path / "other", seed=7)
    with pytest.raises(RegistryError, match="not the ones the merge check ran on"):
        registry.register(
            "demo", merge_adapter(base, other, tmp_path / "m"), kind="merged", merge_check=checked
        )
    assert registry.versions("demo") == []
    assert [p.name for p in (registry.root / "demo").iterdir() if p.name != ".lock"] == [], "no staging left"


# ---------------------------------------------------------------- immutability


def test_verify_passes_on_an_untouched_version(registry: Registry, tmp_path: Path, base: Path) -> None:
    register(registry, tmp_path, base)
    assert registry.verify("demo", "v1", check_base=True).version == "v0001"


def test_one_changed_byte_fails_verification_naming_the_file(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    version = register(registry, tmp_path, base)
    weights = version.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as caught:
        registry.verify("demo", "v0001")
    message = str(caught.value)
    assert message.startswith("demo v0001 failed verification")
    assert "adapter_model.safetensors: sha256 " in message
    assert "adapter_config.json" not in message
    assert "register the model again as a new version" in message


def test_missing_added_resized_files_and_a_changed_base_are_all_named(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    version = register(registry, tmp_path, base)
    (version.path / "extra" / "tokenizer.json").unlink()
    (version.path / "notes.txt").write_text("sneaked in")
    config = version.path / "adapter_config.json"
    config.chmod(0o644)
    config.write_text("{}")
    (base / "config.json").write_text('{"hidden_size": 65}')
    with pytest.raises(IntegrityError) as caught:
        registry.verify("demo", "v0001", check_base=True)
    lines = str(caught.value).splitlines()[1:-1]
    assert [line.strip().split(":")[0] for line in lines] == [
        "notes.txt",
        "adapter_config.json",
        "extra/tokenizer.json",
        f"base model {base}",
    ]


def test_a_damaged_manifest_is_an_integrity_error(registry: Registry, tmp_path: Path, base: Path) -> None:
    version = register(registry, tmp_path, base)
    (version.path / MANIFEST).chmod(0o644)
    (version.path / MANIFEST).write_text("{not json")
    with pytest.raises(IntegrityError, match="unreadable"):
        registry.show("demo", "v1")


# ---------------------------------------------------------------- aliases


def test_promote_rollback_and_history(registry: Registry, tmp_path: Path, base: Path) -> None:
    for seed in range(3):
        register(registry, tmp_path, base, seed)
    assert registry.aliases("demo") == {"production": None, "canary": None}
    registry.promote("demo", "v1")
    registry.promote("demo", "v2")
    registry.promote("demo", "v3", "canary")
    registry.promote("demo", "canary")  # the canary's version, to production
    assert registry.aliases("demo") == {"production": "v0003", "canary": "v0003"}
    assert registry.show("demo", "production").version == "v0003"

    back = registry.rollback("demo")
    assert (back.version, back.previous) == ("v0002", "v0003")
    back = registry.rollback("demo")
    assert (back.version, back.previous) == ("v0001", "v0002")
    with pytest.raises(RegistryError, match="no earlier version to roll back to"):
        registry.rollback("demo")
    assert registry.aliases("demo") == {"production": "v0001", "canary": "v0003"}
    history = [(c.alias, c.action, c.previous, c.version) for c in registry.alias_history("demo")]
    assert history == [
        ("production", "promote", None, "v0001"),
        ("production", "promote", "v0001", "v0002"),
        ("canary", "promote", None, "v0003"),
        ("production", "promote", "v0002", "v0003"),
        ("production", "rollback", "v0003", "v0002"),
        ("production", "rollback", "v0002", "v0001"),
    ]


def test_promoting_the_current_version_is_a_no_op(registry: Registry, tmp_path: Path, base: Path) -> None:
    register(registry, tmp_path, base)
    assert registry.promote("demo", "v1") is not None
    assert registry.promote("demo", "v1") is None
    assert len(registry.alias_history("demo")) == 1


def test_promote_after_rollback_then_rollback_returns_to_the_rolled_back_to(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    for seed in range(3):
        register(registry, tmp_path, base, seed)
    for ref in ("v1", "v2"):
        registry.promote("demo", ref)
    registry.rollback("demo")  # production: v1
    registry.promote("demo", "v3")
    assert registry.rollback("demo").version == "v0001"


def test_rollback_skips_deleted_versions(registry: Registry, tmp_path: Path, base: Path) -> None:
    for seed in range(3):
        register(registry, tmp_path, base, seed)
    for ref in ("v1", "v2", "v3"):
        registry.promote("demo", ref)
    registry.promote("demo", "v1", "canary")  # keep v2 deletable: move nothing onto it
    registry.delete("demo", "v2")
    assert registry.rollback("demo").version == "v0001"


def test_promote_refuses_unknown_aliases_and_tampered_versions(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    version = register(registry, tmp_path, base)
    with pytest.raises(RegistryError, match="unknown alias 'staging'; choose one of production, canary"):
        registry.promote("demo", "v1", "staging")
    with pytest.raises(RegistryError, match="alias canary of demo points at no version yet"):
        registry.show("demo", "canary")
    with pytest.raises(RegistryError, match="has no version v0009"):
        registry.promote("demo", "v9")
    (version.path / "notes.txt").write_text("x")
    with pytest.raises(IntegrityError):
        registry.promote("demo", "v1")
    assert registry.aliases("demo")["production"] is None


# ---------------------------------------------------------------- delete


def test_delete_refuses_an_aliased_version_and_says_how_to_move_it(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    register(registry, tmp_path, base, 0)
    register(registry, tmp_path, base, 1)
    registry.promote("demo", "v1")
    with pytest.raises(RegistryError) as caught:
        registry.delete("demo", "v1")
    message = str(caught.value)
    assert "demo v0001 is the production version" in message
    assert "clusterft registry promote demo VERSION --alias production" in message
    assert "clusterft registry rollback demo --alias production" in message
    assert registry.show("demo", "v1").version == "v0001"


def test_delete_refuses_a_version_a_live_replica_serves(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    from clusterft.registry.serving import ServingRecord, write_record

    def serving_since(at: float) -> None:
        record = ServingRecord("demo", "v0001", "production", "app", "r1", "node-1", 1, at, at, 5.0)
        write_record(registry.root, record)

    register(registry, tmp_path, base, 0)
    serving_since(time.time())
    with pytest.raises(RegistryError, match=r"v0001 is still served by a live replica \(app/r1 on node-1\)"):
        registry.delete("demo", "v1")
    serving_since(time.time() - 60)  # a replica that died a minute ago does not hold the version
    assert registry.delete("demo", "v1").version == "v0001"


def test_deleted_numbers_are_never_reused(registry: Registry, tmp_path: Path, base: Path) -> None:
    register(registry, tmp_path, base, 0)
    register(registry, tmp_path, base, 1)
    deleted = registry.delete("demo", "v2")
    assert not deleted.path.exists()
    assert [v.version for v in registry.versions("demo")] == ["v0001"]
    assert register(registry, tmp_path, base, 2).version == "v0003"
    with pytest.raises(RegistryError, match="has no version v0002"):
        registry.show("demo", "v2")


# ---------------------------------------------------------------- concurrency


def _register_in_process(root: str, source: str, base: str, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    Registry(root).register("demo", source, kind="adapter", base_model=base)


def _promote_in_process(root: str, refs: list[str], alias: str, barrier: object) -> None:
    registry = Registry(root)
    barrier.wait()  # type: ignore[attr-defined]
    for ref in refs:
        registry.promote("demo", ref, alias, verify=False)


def _run(target: object, argsets: list[tuple]) -> None:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(argsets))
    processes = [context.Process(target=target, args=(*args, barrier)) for args in argsets]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0


def test_concurrent_registrations_get_distinct_complete_versions(
    registry: Registry, tmp_path: Path, base: Path
) -> None:
    sources = [make_adapter(tmp_path / f"src{i}", seed=i) for i in range(4)]
    _run(_register_in_process, [(str(registry.root), str(s), str(base)) for s in sources])
    versions = registry.versions("demo")
    assert [v.version for v in versions] == ["v0001", "v0002", "v0003", "v0004"]
    for version in versions:
        registry.verify("demo", version.version)
    weights = {v.manifest.files["adapter_model.safetensors"].sha256 for v in versions}
    assert len(weights) == 4, "each process published its own files"


def test_concurrent_alias_moves_lose_no_history(registry: Registry, tmp_path: Path, base: Path) -> None:
    for seed in range(4):
        register(registry, tmp_path, base, seed)
    cycle = ["v1", "v2", "v3", "v4"] * 5
    _run(
        _promote_in_process,
        [(str(registry.root), cycle, "production"), (str(registry.root), cycle[::-1], "canary")],
    )
    history = registry.alias_history("demo")
    assert len([c for c in history if c.alias == "production"]) == 20
    assert len([c for c in history if c.alias == "canary"]) == 20
    assert registry.aliases("demo") == {"production": "v0004", "canary": "v0001"}
    # Each alias's history is a chain: every move starts where the previous one ended.
    for alias in ("production", "canary"):
        moves = [c for c in history if c.alias == alias]
        assert all(a.version == b.previous for a, b in itertools.pairwise(moves))
