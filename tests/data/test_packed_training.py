"""A neat-packed run on 2 Ray Train workers: the driver tokenizes once into the run's cache (the
workers map it), and a SIGKILLed worker resumes from the packed (epoch, micro_step) position to
bitwise the weights of the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from clusterft.train.launcher import locate, run_training
from tests.train.conftest import ray_cluster, tiny_llama  # noqa: F401  (fixtures)
from tests.train.helpers import WorkerKiller, final_weights, make_job

pytestmark = pytest.mark.slow


def _packed_job(model_dir, out):
    # cutoff 96: three or four demo examples a row; 64 examples pack into ~18 rows, 4 a micro-step
    return make_job(model_dir, out, neat_packing=True, cutoff_len=96, per_device_train_batch_size=1)


def test_a_killed_worker_resumes_a_neat_packed_run_bitwise(ray_cluster, tiny_llama, tmp_path):  # noqa: F811
    reference = _packed_job(tiny_llama, tmp_path / "reference")
    summary = run_training(reference, show_progress=False)
    assert summary.ok, summary.error
    (entry,) = (locate(reference).run_dir / "data_cache").iterdir()  # one build, by the driver
    assert (entry / "train.arrow").is_file()

    spec = _packed_job(tiny_llama, tmp_path / "killed")
    killer = WorkerKiller(spec, after_step=4)
    killer.start()
    summary = run_training(spec, show_progress=False)
    killer.join(timeout=5)
    assert killer.killed_pid is not None
    assert summary.ok, summary.error
    assert summary.restarts == 1 and summary.completed_steps == summary.planned_steps == 8
    expected, actual = final_weights(reference), final_weights(spec)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "weights differ after resume"
