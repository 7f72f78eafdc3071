"""A weights-only run into the folder of an earlier run, with real Ray Train runs (1 worker, a few
steps): it starts from the earlier run's weights, writes, prunes and exports only its own bundles,
and a relaunch of it continues them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clusterft.train.launcher import run_training
from tests.train.helpers import bundles, make_job

pytestmark = pytest.mark.slow


def test_a_weights_only_run_sees_only_its_own_bundles(ray_cluster, tiny_llama, tmp_path):
    out = tmp_path / "out"
    one_worker = {"cluster": {"num_workers": 1}}
    first = make_job(tiny_llama, out, max_steps=4, **one_worker)
    assert run_training(first, show_progress=False).ok
    root = bundles(first)
    assert [(i.step, i.valid) for i in root.list()] == [(2, True), (4, True)]

    # New settings, same output_dir: its steps start from 0 again, below the first run's step 4.
    changed = {"max_steps": 2, "save_steps": 1, "learning_rate": 5e-3, "checkpoint": {"keep_last": 1}}
    second = make_job(tiny_llama, out, resume={"weights_only": True}, **changed, **one_worker)
    summary = run_training(second, show_progress=False)
    assert summary.ok, summary.error
    assert summary.resumed_from == ["step_000000004"]  # the first run's newest weights
    assert [(i.step, i.valid) for i in root.list()] == [(2, True), (4, True)]  # not pruned by it
    (run,) = root.runs()[1:]
    assert [i.step for i in run.list()] == [2]  # its own prune kept its own newest
    assert summary.completed_steps == 2 and summary.checkpoint == run.location("step_000000002")
    trained = {k.replace(".default", ""): v for k, v in final_state(run).items()}
    exported = load_file(Path(second.train.output_dir) / "adapter_model.safetensors")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)  # exported from its own bundle

    # Its driver relaunched (the controller does this after a failure): it continues its own bundle.
    again = run_training(second, show_progress=False)
    assert again.ok, again.error
    assert again.resumed_from == ["step_000000002"] and again.checkpoint == summary.checkpoint
    assert len(root.runs()) == 2 and [i.step for i in root.list()] == [2, 4]


def final_state(store) -> dict:
    from clusterft.train.checkpointing import bundle_weights, load_bundle

    return bundle_weights(load_bundle(store, store.find_latest_valid().name, rank=0))
