"""Tiny models made once per session for the engine tests."""

from __future__ import annotations

import pytest

from clusterft.runtime import apply_runtime_defaults

apply_runtime_defaults()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    from clusterft.hf.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "llama-tiny", "llama", "tiny", seed=0)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    from clusterft.hf.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "qwen2-tiny", "qwen2", "tiny", seed=0)


@pytest.fixture(scope="session")
def model_dirs(llama_dir, qwen2_dir):
    return {"llama": llama_dir, "qwen2": qwen2_dir}
