"""Checkpoint bundles: atomic publish, verification of every kind of damage, keep-last-K pruning."""

from __future__ import annotations

import json
import logging

import pytest

from clusterft.storage import BundleStore, Storage


def save(store: BundleStore, step: int, payload: bytes = b"weights") -> str:
    tmp = store.begin(step)
    store.put_bytes(tmp, "model.pt", payload * 100)
    store.put_bytes(tmp, "rank0/rng.pt", b"rng")
    return store.publish(tmp, step, {"global_step": step}).name


@pytest.fixture
def store(tmp_path):
    return BundleStore(tmp_path / "ckpt")


def test_publish_writes_manifest_last_and_renames(store, tmp_path):
    name = save(store, 4)
    assert name == "step_000000004"
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["step_000000004"]
    manifest = json.loads((root / name / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "rank0/rng.pt"}
    assert manifest["files"]["model.pt"]["bytes"] == 700
    assert manifest["meta"] == {"global_step": 4}
    info = store.find_latest_valid()
    assert (info.name, info.step, info.valid, info.meta) == (name, 4, True, {"global_step": 4})


def test_unpublished_temp_dir_is_never_a_bundle(store):
    save(store, 2)
    tmp = store.begin(4)
    store.put_bytes(tmp, "model.pt", b"half")
    assert [i.name for i in store.list()] == ["step_000000002"]
    assert store.find_latest_valid().step == 2


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:10]), "truncated"),
        (lambda d: (d / "rank0" / "rng.pt").write_bytes(b""), "0 bytes"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest"),
        (lambda d: (d / "manifest.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "model.pt").write_bytes(b"x" * 700), "sha256 mismatch"),
        (lambda d: (d / "model.pt").unlink(), "missing"),
        (lambda d: (d / "stray.pt").write_bytes(b"?"), "not in the manifest"),
    ],
)
def test_damaged_newest_is_skipped_with_warning(store, tmp_path, caplog, damage, problem):
    save(store, 2)
    newest = save(store, 4)
    damage(tmp_path / "ckpt" / newest)
    with caplog.at_level(logging.WARNING):
        info = store.find_latest_valid()
    assert info.step == 2
    assert newest in caplog.text and problem in caplog.text
    assert problem in store.inspect(newest).problem


def test_nothing_valid(store, tmp_path):
    assert store.find_latest_valid() is None
    name = save(store, 1)
    (tmp_path / "ckpt" / name / "manifest.json").unlink()
    assert store.find_latest_valid() is None


def test_prune_keeps_last_k_valid_and_never_the_newest(store, tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(store, step)
    (tmp_path / "ckpt" / "step_000000002" / "model.pt").write_bytes(b"")  # invalid (size check)
    stale = store.begin(3)  # a save that died
    newer_tmp = store.begin(9)  # a save in progress, newer than every bundle
    deleted = store.prune(keep_last=2)
    assert sorted(deleted) == sorted(["step_000000001", "step_000000002", "step_000000003", stale])
    assert [i.name for i in store.list()] == ["step_000000004", "step_000000005"]
    assert store.storage.exists(newer_tmp)
    assert store.prune(keep_last=0) == ["step_000000004"]  # 0 still keeps the newest valid
    assert [i.step for i in store.list()] == [5]


def test_prune_keeps_valid_when_newest_is_corrupt(store, tmp_path):
    for step in (1, 2, 3):
        save(store, step)
    (tmp_path / "ckpt" / "step_000000003" / "manifest.json").unlink()
    store.prune(keep_last=1)
    assert [(i.step, i.valid) for i in store.list()] == [(2, True), (3, False)]


def test_republish_replaces_an_invalid_bundle_of_the_same_step(store, tmp_path):
    name = save(store, 3)
    (tmp_path / "ckpt" / name / "manifest.json").unlink()
    save(store, 3, payload=b"again")
    assert store.find_latest_valid().step == 3


def test_pyarrow_uri_storage(tmp_path):
    store = BundleStore(f"file://{tmp_path}/uri")
    save(store, 7)
    assert store.find_latest_valid().step == 7
    assert Storage(f"file://{tmp_path}/uri").listdir() == ["step_000000007"]


def test_remote_filesystem_code_path():
    """pyarrow's in-memory mock filesystem takes the remote (non-local) branches of Storage."""
    store = BundleStore("mock:///bucket/run")
    assert store.storage.local_path() is None
    save(store, 1)
    newest = save(store, 2)
    store.storage.write_bytes(f"{newest}/model.pt", b"short")
    assert store.find_latest_valid().step == 1
    assert store.prune(keep_last=1) == []
    assert [(i.step, i.valid) for i in store.list()] == [(1, True), (2, False)]
