"""The merge-equivalence check on real tiny models and real peft merges: correct merges pass with
the measured differences; merges broken in the ways users meet (scaling, another base, an edited
tensor, no adapter at all) fail with the numbers, the place and the likely cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clusterft.errors import UserError
from clusterft.hf.loading import load_tokenizer, model_fingerprint
from clusterft.hf.lora import merge_adapter
from clusterft.hf.merge_check import (
    DEFAULT_TOLERANCE,
    PROBE_TEXTS,
    REPORT_FILE,
    MergeCheckError,
    check_merge,
    merge_checked,
    probe_token_ids,
)
from clusterft.hf.tiny import make_tiny_model
from tests.hf.helpers import make_trained_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", "tiny", seed=0)


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on every projection with random, non-zero B: merging it changes every layer."""
    return make_trained_adapter(base, tmp_path_factory.mktemp("adapters") / "a")


def failure_of(*args, **kwargs) -> MergeCheckError:
    with pytest.raises(MergeCheckError) as caught:
        check_merge(*args, **kwargs)
    return caught.value


def edit_weights(model_dir: Path, name: str, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = edit(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_correct_fp32_merge_passes_and_writes_its_report(base: Path, adapter: Path, tmp_path: Path) -> None:
    report = merge_checked(base, adapter, tmp_path / "merged")
    # Measured: ~4e-06 of the logits' RMS (~0.22); tolerance 1e-3.
    assert report.passed and report.dtype == "float32" and report.tolerance == DEFAULT_TOLERANCE["float32"]
    assert 0 < report.rel_diff < 2e-5
    assert report.max_abs_diff == pytest.approx(report.rel_diff * report.logits_rms)
    assert report.adapter_effect > 1.0, "the adapter changes the logits far more than the tolerance"
    tokenizer = load_tokenizer(base)
    assert report.prompts == len(PROBE_TEXTS)
    assert report.tokens == sum(len(tokenizer(text)["input_ids"]) for text in PROBE_TEXTS)
    assert report.base_model == str(base.resolve()) and report.adapter == str(adapter.resolve())
    assert report.merged_fingerprint == model_fingerprint(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / REPORT_FILE).read_text())
    assert saved == report.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "no staging dir is left behind"


@pytest.mark.parametrize(("dtype", "low", "high"), [("bfloat16", 0.01, 0.15), ("float16", 1e-3, 0.02)])
def test_half_precision_merges_pass_within_their_looser_tolerance(
    base: Path, adapter: Path, tmp_path: Path, dtype: str, low: float, high: float
) -> None:
    merged = merge_adapter(base, adapter, tmp_path / "merged", dtype=dtype)
    report = check_merge(base, adapter, merged)  # the dtype is read from the merged config
    assert report.dtype == dtype and report.passed
    assert low < report.rel_diff < high <= report.tolerance
    assert report.rel_diff > DEFAULT_TOLERANCE["float32"], "float32's tolerance would reject it"


def test_a_merge_with_doubled_scaling_fails_and_names_the_scaling(
    base: Path, adapter: Path, tmp_path: Path
) -> None:
    doubled = tmp_path / "doubled"
    shutil.copytree(adapter, doubled)
    config = json.loads((doubled / "adapter_config.json").read_text())
    (doubled / "adapter_config.json").write_text(
        json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]})
    )
    merged = merge_adapter(base, doubled, tmp_path / "merged")

    error = failure_of(base, adapter, merged)
    report, message = error.report, str(error)
    assert not report.passed and report.rel_diff > 1.0
    assert f"by max {report.max_abs_diff:.4g} ({report.rel_diff:.3g} of the logits' RMS" in message
    assert "tolerance 0.001 for float32" in message
    assert f"worst at probe {report.worst_prompt} token position {report.worst_position}" in message
    assert "every adapted tensor of the merged model is base + 2x the adapter's update" in message
    assert "the scaling differs (lora_alpha / r, use_rslora changed" in message
    assert isinstance(error, UserError)


def test_one_perturbed_tensor_fails_at_the_probe_and_position_it_first_touches(
    base: Path, adapter: Path, tmp_path: Path
) -> None:
    merged = merge_adapter(base, adapter, tmp_path / "merged")
    probes = probe_token_ids(load_tokenizer(base))
    # A token that occurs in one probe only: perturbing its embedding changes that probe alone,
    # from that token's position on (causal attention).
    counts = {t: sum(t in ids for ids in probes) for ids in probes for t in ids}
    token, prompt = next((t, i) for i, ids in enumerate(probes) for t in ids if counts[t] == 1)
    edit_weights(
        merged, "model.embed_tokens.weight", lambda w: w.index_put_((torch.tensor([token]),), w[token] + 1.0)
    )

    error = failure_of(base, adapter, merged)
    assert error.report.worst_prompt == prompt
    assert error.report.worst_position >= probes[prompt].index(token)
    assert "differ from base + update, also ones the adapter does not touch" in str(error)
    assert "(such as model.embed_tokens.weight)" in str(error)


def test_an_adapter_merged_into_another_base_fails(base: Path, adapter: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "other-base", "llama", "tiny", seed=1)
    merged = merge_adapter(other, adapter, tmp_path / "merged")
    error = failure_of(base, adapter, merged)
    assert error.report.rel_diff > 1.0
    assert "another base model" in str(error)


def test_a_merge_without_the_adapter_is_named_as_such(base: Path, adapter: Path, tmp_path: Path) -> None:
    unmerged = tmp_path / "unmerged"
    shutil.copytree(base, unmerged)
    error = failure_of(base, adapter, unmerged)
    assert "the adapter's update is missing" in str(error)
    assert error.report.max_abs_diff == pytest.approx(error.report.adapter_effect)


def test_extra_probes_are_checked_too(base: Path, adapter: Path, tmp_path: Path) -> None:
    merged = merge_adapter(base, adapter, tmp_path / "merged")
    extra = [[5, 6, 7, 8], list(range(10, 400))]
    report = check_merge(base, adapter, merged, extra_probes=extra)
    assert report.prompts == len(PROBE_TEXTS) + 2
    baseline = check_merge(base, adapter, merged)
    assert report.tokens == baseline.tokens + 4 + 256, "records are cut to MAX_PROBE_TOKENS"


def test_bad_inputs_are_user_errors(base: Path, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a peft adapter dir"):
        check_merge(base, tmp_path, base)
    with pytest.raises(UserError, match="unsupported dtype 'int8'; use one of float32, bfloat16, float16"):
        check_merge(base, adapter, base, dtype="int8")
