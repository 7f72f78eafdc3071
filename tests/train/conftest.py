"""Fixtures shared by the training tests: one tiny model per session, a local Ray cluster per module."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from clusterft.hf.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", "tiny")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for one test module (Ray Train runs), always shut down."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="cftray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
