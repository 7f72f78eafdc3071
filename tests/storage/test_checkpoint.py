"""Checkpoint bundles: atomic publish (in place on object stores), verification of every kind of
damage, keep-last-K pruning that checks sums, run folders."""

from __future__ import annotations

import json
import logging

import fsspec
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem

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


def corrupt_same_size(store: BundleStore, name: str) -> None:
    """Flip bytes without changing the size: only a sha256 check can tell."""
    path = store.storage.local_path(f"{name}/model.pt")
    path.write_bytes(b"X" * path.stat().st_size)


def test_prune_checks_sums_so_a_same_size_corrupt_newest_costs_no_valid_bundle(store):
    for step in (1, 2, 3):
        save(store, step)
    corrupt_same_size(store, "step_000000003")
    # Step 2 is the newest bundle that verifies, so it stays; the damaged step 3 is newer, and stays too
    # (a resume skips it). A size check alone kept step 3 as "newest valid" and deleted 1 and 2.
    assert store.prune(keep_last=1) == ["step_000000001"]
    assert [(i.step, i.valid) for i in store.list()] == [(2, True), (3, False)]
    assert store.find_latest_valid().step == 2


def test_prune_keeps_k_bundles_that_verify(store):
    for step in (1, 2, 3, 4):
        save(store, step)
    corrupt_same_size(store, "step_000000003")
    assert sorted(store.prune(keep_last=2)) == ["step_000000001", "step_000000003"]
    assert [(i.step, i.valid) for i in store.list()] == [(2, True), (4, True)]


def test_a_verified_bundle_rewritten_later_is_verified_again(store):
    save(store, 1)
    newest = save(store, 2)
    assert store.inspect(newest).valid  # verified once, remembered
    corrupt_same_size(store, newest)  # new mtime: the remembered check no longer holds
    assert store.inspect(newest).problem == "model.pt: sha256 mismatch"
    assert store.prune(keep_last=1) == []
    assert store.find_latest_valid().step == 1


class CountingHandler(FSSpecHandler):
    """fsspec's in-memory filesystem as a pyarrow filesystem, counting the files opened for reading."""

    def __init__(self, fs):
        super().__init__(fs)
        self.reads: list[str] = []

    def open_input_stream(self, path):
        self.reads.append(path.removeprefix("/bucket/run/"))
        return super().open_input_stream(path)


class ObjectStoreHandler(CountingHandler):
    """Like S3 or GCS through pyarrow: a directory cannot be moved (pyarrow's own filesystem tests run
    S3 with allow_move_dir=False)."""

    def move(self, src, dest):
        if self.fs.isdir(src):
            raise OSError(f"cannot move directory {src}: object stores have no directory rename")
        super().move(src, dest)


@pytest.fixture
def memory():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/bucket", recursive=True) if fs.exists("/bucket") else None


def test_prune_after_every_save_hashes_each_bundle_once(memory):
    """Saving and pruning to keep 3, the saving store reads only manifests when it prunes (it wrote
    and checksummed every bundle itself); a fresh store hashes each kept bundle once, then no more."""
    handler = CountingHandler(memory)
    store = BundleStore(Storage("/bucket/run", filesystem=PyFileSystem(handler)))
    for step in range(1, 7):
        save(store, step)
        handler.reads.clear()
        store.prune(keep_last=3)
        assert {read.split("/", 1)[1] for read in handler.reads} == {"manifest.json"}
    fresh = BundleStore(store.storage)
    handler.reads.clear()
    fresh.prune(keep_last=3)
    hashed = sorted(read for read in handler.reads if not read.endswith("manifest.json"))
    kept = ("step_000000004", "step_000000005", "step_000000006")
    assert hashed == sorted(f"{name}/{file}" for name in kept for file in ("model.pt", "rank0/rng.pt"))
    handler.reads.clear()
    fresh.prune(keep_last=3)
    assert all(read.endswith("manifest.json") for read in handler.reads)


def test_object_store_publishes_in_place_and_the_manifest_commits(memory):
    """No directory rename on an object store: a save is written as step_N itself, and until its
    manifest is written it is a save in progress that nothing loads or prunes."""
    store = BundleStore(Storage("/bucket/run", filesystem=PyFileSystem(ObjectStoreHandler(memory))))
    assert not store.storage.renames_atomically
    save(store, 1)
    tmp = store.begin(2)
    assert tmp == "step_000000002"
    store.put_bytes(tmp, "model.pt", b"half")
    assert [(i.step, i.problem) for i in store.list()] == [
        (1, None),
        (2, "no manifest (a save in progress, or one that did not finish)"),
    ]
    assert store.find_latest_valid().step == 1
    assert store.prune(keep_last=1) == []  # newer than the newest valid: it may be in progress
    # The save died; after a restart the same step is saved again over what it left.
    assert save(store, 2, payload=b"again") == "step_000000002"
    assert store.find_latest_valid().step == 2
    assert store.prune(keep_last=1) == ["step_000000001"]
    assert [i.name for i in store.list()] == ["step_000000002"]
    assert Storage("/bucket/run", filesystem=PyFileSystem(ObjectStoreHandler(memory))).listdir() == [
        "step_000000002"
    ]


def test_later_runs_live_in_run_folders(store, tmp_path):
    save(store, 2)
    assert store.holds_bundles() and [r.storage.uri for r in store.runs()] == [store.storage.uri]
    later = store.new_run()
    assert later.storage.uri.startswith(f"{store.storage.uri}/run-") and not later.holds_bundles()
    save(later, 1)
    assert [r.storage.uri for r in store.runs()] == [store.storage.uri, later.storage.uri]
    assert [i.name for i in store.list()] == ["step_000000002"]  # a run folder is not a bundle
    assert store.prune(keep_last=1) == [] and later.prune(keep_last=1) == []
    assert later.location("step_000000001") == f"{later.storage.uri}/step_000000001"
