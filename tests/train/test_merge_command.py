"""`clusterft merge`: checks the merge by default, writes merge_check.json beside the merged model,
and leaves nothing at the output path when the check fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterft import cli
from clusterft.hf import lora
from clusterft.hf.merge_check import REPORT_FILE
from tests.hf.helpers import make_trained_adapter


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "a")


def test_merge_writes_the_model_and_its_passing_check(
    tiny_llama: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert cli.main(["merge", str(tiny_llama), str(adapter), str(out)]) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["passed"] and report["dtype"] == "float32" and report["rel_diff"] < 2e-5
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "merge check passed on 5 probes" in capsys.readouterr().err


def test_a_merge_that_fails_the_check_exits_2_and_leaves_no_output(
    tiny_llama: Path,
    adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_merge = lora.merge_adapter

    def merge_with_a_bug(base, adapter_dir, out_dir, *, dtype="float32"):
        """The real merge, then one tensor scaled: a corrupted or miswritten merge."""
        from safetensors.torch import load_file, save_file

        merged = real_merge(base, adapter_dir, out_dir, dtype=dtype)
        tensors = load_file(merged / "model.safetensors")
        tensors["model.layers.1.mlp.down_proj.weight"] *= 1.5
        save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
        return merged

    monkeypatch.setattr(lora, "merge_adapter", merge_with_a_bug)
    out = tmp_path / "merged"
    assert cli.main(["merge", str(tiny_llama), str(adapter), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: merge check failed: merged-model logits differ from base+adapter")
    assert "tolerance 0.001 for float32" in err
    assert "model.layers.1.mlp.down_proj.weight differs from base + update by" in err
    assert f"Nothing was written to {out}." in err
    assert list(tmp_path.iterdir()) == [], "neither the merged model nor its staging dir is left"


def test_merge_refuses_a_non_empty_output(
    tiny_llama: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["merge", str(tiny_llama), str(adapter), str(tmp_path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
