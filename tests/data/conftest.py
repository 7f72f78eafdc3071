"""Fixtures of the data tests: one tiny model (and its tokenizer) per session, and a dataset-dir maker."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clusterft.hf.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


DatasetDirMaker = Callable[[dict[str, Any], dict[str, str]], Path]


@pytest.fixture
def make_dataset_dir(tmp_path: Path) -> DatasetDirMaker:
    """Write dataset_info.json (`info`) and raw files ({file name: text}) to a fresh directory."""

    def make(info: dict[str, Any], files: dict[str, str]) -> Path:
        (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
        for name, text in files.items():
            (tmp_path / name).write_text(text, encoding="utf-8")
        return tmp_path

    return make
