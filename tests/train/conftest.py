"""Fixtures shared by the training tests: one tiny model per session."""

from __future__ import annotations

import pytest

from clusterft.hf.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", "tiny")
