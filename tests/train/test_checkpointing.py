"""Training bundles as data: saved and loaded with weights_only=True (RNG exact), older pickled bundles
and foreign pickles refused; and which bundle a run starts from and which folder it writes to."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterft.errors import UserError
from clusterft.storage import BundleStore
from clusterft.train.checkpointing import (
    RunStart,
    StartChoice,
    bundle_weights,
    choose_start,
    load_bundle,
    save_bundle,
    start_run,
)
from clusterft.train.state import copy_pieces, rng_state, seed_everything, set_rng_state
from tests.train.helpers import make_job

# A consolidated part, as bundles of the format before shards (tensors/1) hold it.
STATE = {
    "weights": {"w": torch.arange(6.0)},
    "exp_avg": {"w": torch.ones(6)},
    "exp_avg_sq": {"w": None},
    "step": torch.tensor(3.0),
}
# One rank's shard (shards/1): parameter w (2 x 3) whole, in one flat tensor.
SHARD = {
    "format": "shard/1",
    "weights": [torch.arange(6.0)],
    "exp_avg": [torch.ones(6)],
    "exp_avg_sq": [torch.zeros(6)],
    "step": torch.tensor(3.0),
    "pieces": [["w", [2, 3], 0, 6, 0, 0]],
}


def trainer(step: int) -> dict:
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([torch.zeros(1)]), lambda s: 0.5)
    return {
        "global_step": step,
        "scheduler": scheduler.state_dict(),
        "compat": {"model": "m"},
        "spec_hash": "h",
    }


def save(store: BundleStore, step: int) -> str:
    info = save_bundle(
        store,
        step,
        rank=0,
        shard=SHARD,
        trainer=trainer(step),
        rng=rng_state(),
        meta={"global_step": step, "spec_hash": "h"},
        keep_last=3,
    )
    return info.name


def draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(2).tolist(), torch.rand(2).tolist()


@pytest.mark.parametrize("root", ["local", "mock:///bucket/run"])
def test_bundle_files_are_tensors_and_plain_data_and_rng_resumes_exactly(tmp_path, root):
    """Every file loads with weights_only=True, and restoring the RNG continues every generator
    exactly (mock:// is pyarrow's non-local filesystem: the bundle is committed in place there)."""
    store = BundleStore(tmp_path / "b" if root == "local" else root)
    seed_everything(11)
    random.gauss(0, 1)  # python's cached second gaussian is part of the state
    np.random.standard_normal()
    name = save(store, 4)
    expected = draws()
    for rel in store.files(name):
        torch.load(io.BytesIO(store.read_bytes(name, rel)), weights_only=True)
    loaded = load_bundle(store, name, rank=0)
    set_rng_state(loaded.rng)
    assert draws() == expected
    assert loaded.trainer["global_step"] == 4
    assert torch.equal(bundle_weights(loaded)["w"], torch.arange(6.0).view(2, 3))


def test_a_bundle_from_before_weights_only_is_refused_with_the_way_out(tmp_path):
    """As the previous format wrote it: numpy's RNG state pickled as an ndarray, no state_format."""
    store = BundleStore(tmp_path / "b")
    tmp = store.begin(2)
    old_rng = {"numpy": np.random.get_state(), "python": random.getstate()}
    for rel, obj in [("trainer.pt", trainer(2)), ("state/part-0.pt", STATE), ("rng/rank-0.pt", old_rng)]:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        store.put_bytes(tmp, rel, buffer.getvalue())
    name = store.publish(tmp, 2, {"global_step": 2}).name
    with pytest.raises(UserError, match=r"written by an older clusterft.*another checkpoint\.name"):
        load_bundle(store, name, rank=0)


class Payload:
    """What a hostile pickle does when it is loaded: here, create a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_runs_code_is_not_loaded(tmp_path):
    store = BundleStore(tmp_path / "b")
    name = save(store, 2)
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"global_step": 2, "x": Payload(marker)}, buffer)
    # Swapped in and vouched for by a rewritten manifest: the sums cannot stop this, loading must.
    tmp = store.begin(2)
    for rel in store.files(name):
        store.put_bytes(tmp, rel, buffer.getvalue() if rel == "trainer.pt" else store.read_bytes(name, rel))
    store.publish(tmp, 2, store.inspect(name).meta)
    with pytest.raises(UserError, match=r"trainer\.pt holds Python objects other than tensors"):
        load_bundle(store, name, rank=0)
    assert not marker.exists()


# ---------------------------------------------------------------- start_run


def job(tmp_path: Path, **overrides):
    return make_job(tmp_path / "model", tmp_path / "out", **overrides)


def publish(store: BundleStore, step: int, spec) -> str:
    tmp = store.begin(step)
    store.put_bytes(tmp, "state/part-0.pt", b"w")
    return store.publish(tmp, step, {"spec_hash": spec.spec_hash()}).name


def bundles_dir(tmp_path: Path) -> str:
    return str(tmp_path / "out" / "ckpt" / "out" / "bundles")


def test_weights_only_into_the_same_folder_starts_a_run_folder_of_its_own(tmp_path):
    first = job(tmp_path)
    root = BundleStore(bundles_dir(tmp_path))
    for step in (2, 4, 6):
        publish(root, step, first)
    second = job(tmp_path, learning_rate=5e-3, resume={"weights_only": True})
    start = start_run(second, root.storage.uri, None)
    assert start.bundle == root.location("step_000000006")
    assert Path(start.bundle_root).parent == Path(root.storage.uri)
    assert Path(start.bundle_root).name.startswith("run-")
    # The new run saves step 2 and prunes to 1: the first run's bundles are not its to touch.
    later = BundleStore(start.bundle_root)
    publish(later, 1, second)
    publish(later, 2, second)
    assert later.prune(keep_last=1) == ["step_000000001"]
    assert [i.step for i in root.list()] == [2, 4, 6]
    # Its driver relaunched: it continues its own bundles, in its own folder.
    assert start_run(second, root.storage.uri, None) == RunStart(
        start.bundle_root, later.location("step_000000002")
    )
    # A third spec, weights only: it starts from the run that saved last, not from the highest step.
    third = job(tmp_path, learning_rate=1e-3, resume={"weights_only": True})
    start3 = start_run(third, root.storage.uri, None)
    assert start3.bundle == later.location("step_000000002")
    assert start3.bundle_root not in (root.storage.uri, start.bundle_root)
    # The first spec again: its own folder, its own newest bundle.
    assert start_run(first, root.storage.uri, None) == RunStart(
        root.storage.uri, root.location("step_000000006")
    )


def test_an_exact_resume_continues_the_folder_it_resumes(tmp_path):
    first = job(tmp_path)
    root = BundleStore(bundles_dir(tmp_path))
    publish(root, 4, first)
    longer = job(tmp_path, max_steps=12)  # a changed spec resumed exactly: the same run, continued
    assert start_run(longer, root.storage.uri, None) == RunStart(
        root.storage.uri, root.location("step_000000004")
    )
    assert start_run(
        job(tmp_path, resume={"enabled": False}, overwrite_output_dir=True), root.storage.uri, None
    ) == RunStart(root.storage.uri, None)
    assert not root.holds_bundles()


def test_from_checkpoint_into_a_folder_holding_another_run(tmp_path):
    other = BundleStore(tmp_path / "other" / "bundles")
    source = publish(other, 8, job(tmp_path, learning_rate=1e-3))
    root = BundleStore(bundles_dir(tmp_path))
    publish(root, 4, job(tmp_path))
    spec = job(
        tmp_path, max_steps=4, resume={"from_checkpoint": str(tmp_path / "other" / "bundles" / source)}
    )
    start = start_run(spec, root.storage.uri, tmp_path / "other" / "bundles" / source)
    assert start.bundle == other.location(source) and Path(start.bundle_root).name.startswith("run-")
    fresh = BundleStore(tmp_path / "fresh")
    assert start_run(spec, fresh.storage.uri, tmp_path / "other" / "bundles" / source) == RunStart(
        fresh.storage.uri, other.location(source)
    )


def test_choose_start_changes_nothing_and_start_run_carries_it_out(tmp_path):
    """The controller shows `choose_start`'s answer before the driver runs: it must delete and create
    nothing (a weights-only run's new folder, the bundles resume.enabled false deletes)."""
    first = job(tmp_path)
    root = BundleStore(bundles_dir(tmp_path))
    newest = root.location(publish(root, 4, first))
    weights_only = job(tmp_path, learning_rate=5e-3, resume={"weights_only": True})
    assert choose_start(weights_only, root.storage.uri, None) == StartChoice(newest, None, clear=False)
    fresh = job(tmp_path, resume={"enabled": False}, overwrite_output_dir=True)
    assert choose_start(fresh, root.storage.uri, None) == StartChoice(None, root.storage.uri, clear=True)
    assert len(root.runs()) == 1 and [i.step for i in root.list()] == [4]

    # A bundle to start from that the overwrite would delete first: refused, nothing deleted.
    doomed = job(tmp_path, resume={"enabled": False, "from_checkpoint": newest}, overwrite_output_dir=True)
    with pytest.raises(UserError, match=r"resume.from_checkpoint: .* deletes before the run starts"):
        start_run(doomed, root.storage.uri, Path(newest))
    assert [i.step for i in root.list()] == [4]


# ---------------------------------------------------------------- shards and resharding


def shards_of(full: dict[str, torch.Tensor], ranks: int) -> list[dict]:
    """What `ranks` ddp ranks save of `full`: each rank 1/ranks of every tensor, in a flat of its own."""
    out = []
    for rank in range(ranks):
        weights, pieces = [], []
        for name, tensor in full.items():
            chunk = -(-tensor.numel() // ranks)
            start = min(rank * chunk, tensor.numel())
            part = tensor.reshape(-1)[start : start + chunk].clone()
            pieces.append([name, list(tensor.shape), start, part.numel(), len(weights), 0])
            weights.append(part)
        out.append({"format": "shard/1", "weights": weights, "step": None, "pieces": pieces})
    return out


@pytest.mark.parametrize("saved_on, restored_on", [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_shards_of_n_ranks_fill_m_ranks_ranges_exactly(saved_on, restored_on):
    """Resharding is range arithmetic: the ranges M ranks need are filled, bit for bit, from the
    overlapping pieces of N ranks' shards (7 x 3 = 21 elements: no split is even)."""
    full = {"a": torch.randn(7, 3), "b": torch.randn(5)}
    shards = shards_of(full, saved_on)
    for rank in range(restored_on):
        targets, shapes = {}, {}
        for name, tensor in full.items():
            chunk = -(-tensor.numel() // restored_on)
            start = min(rank * chunk, tensor.numel())
            numel = min(chunk, tensor.numel() - start)
            targets[name] = [(start, numel, {"weights": torch.full((numel,), float("nan"))})]
            shapes[name] = tuple(tensor.shape)
        copy_pieces(targets, shapes, shards)
        for name, [(start, numel, dest)] in targets.items():
            assert torch.equal(dest["weights"], full[name].reshape(-1)[start : start + numel])


def test_a_shard_that_misses_a_range_or_a_shape_is_a_clear_error():
    full = {"a": torch.randn(7, 3)}
    whole = [(0, 21, {"weights": torch.zeros(21)})]
    with pytest.raises(UserError, match=r"elements 0\.\.21 of a are not in it \(14 found\)"):
        copy_pieces({"a": whole}, {"a": (7, 3)}, shards_of(full, 3)[:2])
    with pytest.raises(UserError, match=r"a has shape \(7, 3\), the model \(3, 7\)"):
        copy_pieces({"a": whole}, {"a": (3, 7)}, shards_of(full, 1))


def test_a_bundle_of_consolidated_parts_still_loads(tmp_path):
    """Bundles written before shards (tensors/1: one consolidated part) resume and export."""
    store = BundleStore(tmp_path / "b")
    tmp = store.begin(2)
    for rel, obj in [("trainer.pt", trainer(2)), ("state/part-0.pt", STATE), ("rng/rank-0.pt", rng_state())]:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        store.put_bytes(tmp, rel, buffer.getvalue())
    name = store.publish(tmp, 2, {"global_step": 2, "state_format": "tensors/1"}).name
    assert torch.equal(bundle_weights(load_bundle(store, name, rank=0))["w"], torch.arange(6.0))


def test_the_manifest_holds_what_the_writers_read_back_and_refuses_what_they_did_not_write(tmp_path):
    store = BundleStore(tmp_path / "b")
    tmp = store.begin(2)
    store.put_bytes(tmp, "state/rank-0.pt", b"x" * 10)
    sums = {"state/rank-0.pt": store.file_sum(tmp, "state/rank-0.pt")}
    assert sums["state/rank-0.pt"]["bytes"] == 10
    store.put_bytes(tmp, "state/rank-1.pt", b"stray")
    with pytest.raises(RuntimeError, match=r"state/rank-1\.pt: not in the manifest"):
        store.publish(tmp, 2, {}, sums=sums)
    store.storage.delete_file(f"{tmp}/state/rank-1.pt")
    info = store.publish(tmp, 2, {}, sums=sums)
    assert store.inspect(info.name).valid
