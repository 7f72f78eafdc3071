"""The merge-equivalence check: a merged model must compute what its base plus adapter compute.

    base dir ─► load ─► + adapter (peft) ─┬─► reference logits ──┐
                                          └─► adapter disabled ──┼─► base logits (adapter_effect)
    merged dir ─► load ──────────────────────► merged logits ────┘
    passed  ⇔  max |merged − reference| / RMS(reference) ≤ tolerance(dtype)

Merges go wrong quietly (an adapter merged into another base, a changed lora_alpha, a lossy dtype
round trip): the merged model still loads and generates, only worse. The probes are a few fixed
texts, plus any token ids the caller adds (records of the job's dataset); each runs alone, so no
padding or attention mask enters the comparison. A failure is explained from the weights: each
merged tensor against base + its LoRA update names a scaling error, a missing adapter, another base
or an edited tensor.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clusterft.errors import UserError
from clusterft.hf.loading import model_config, model_fingerprint

REPORT_FILE = "merge_check.json"

# max |merged − reference| / RMS(reference logits), per dtype the models are merged and loaded in.
# Measured on the tiny and small Llama and Qwen2 models, seeds 0-2, with clusterft's rank-8 LoRA
# and lora_B ~ N(0, 0.1) or N(0, 0.01) (updates up to about the size of the base weights): correct
# merges differ by at most 6.6e-6 in float32, 0.083 in bfloat16 and 0.011 in float16; the same
# merges with lora_alpha doubled by 1.0 to 5.5 in every dtype, and fp32 checks of a bf16-rounded
# merge by 0.04 or more. An extreme adapter (updates ~5x the base weights) reaches 9.6e-5 in
# float32, and 1.7 in bfloat16 / 0.18 in float16: half precision really loses such an adapter, so
# failing there is right (merge in float32). float32 leaves 10x headroom over the extreme adapter.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.03}

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "12+34=46",
    "Question: what is the capital of France?\nAnswer: Paris",
    "def add(a, b):\n    return a + b\n",
    "café naïve 日本語",
)
MAX_PROBE_TOKENS = 256


@dataclass(frozen=True)
class MergeCheckReport:
    """What one check compared and measured; `passed` is `rel_diff <= tolerance`."""

    base_model: str  # absolute paths of what was compared
    adapter: str
    base_fingerprint: str  # model_fingerprint: ties the report to these base and merged weights
    merged_fingerprint: str
    dtype: str
    prompts: int
    tokens: int
    max_abs_diff: float  # max |merged − reference| over every probe, position and vocab entry
    logits_rms: float  # RMS of the reference logits: the scale that rel_diff is relative to
    rel_diff: float
    tolerance: float
    adapter_effect: float  # max |reference − base alone|: what the adapter changes at all
    worst_prompt: int  # where max_abs_diff occurs: probe index and token position
    worst_position: int
    passed: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class MergeCheckError(UserError):
    """A merged model does not compute what its base plus adapter compute; `report` says by how much."""

    def __init__(self, message: str, report: MergeCheckReport):
        super().__init__(message)
        self.report = report


def default_tolerance(dtype: str) -> float:
    if dtype not in DEFAULT_TOLERANCE:
        raise UserError(
            f"merge check: unsupported dtype {dtype!r}; use one of {', '.join(DEFAULT_TOLERANCE)}"
        )
    return DEFAULT_TOLERANCE[dtype]


def _saved_dtype(model_dir: Path) -> str:
    config = model_config(model_dir)
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    return saved if saved in DEFAULT_TOLERANCE else "float32"


def _tokenizer_dir(*candidates: Path) -> Path:
    return next((d for d in candidates if (d / "tokenizer_config.json").is_file()), candidates[-1])


def probe_token_ids(tokenizer, extra: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """The fixed probe texts as token ids, then `extra` (each cut to MAX_PROBE_TOKENS)."""
    probes = [tokenizer(text)["input_ids"] for text in PROBE_TEXTS]
    probes += [list(ids) for ids in extra]
    return [ids[:MAX_PROBE_TOKENS] for ids in probes if ids]


def _logits(model, probes: list[list[int]]):
    """(sum of probe lengths, vocab) float32: every probe's logits, one probe per forward."""
    import torch

    with torch.inference_mode():
        return torch.cat([model(input_ids=torch.tensor([ids])).logits[0].float() for ids in probes])


def check_merge(
    base_dir: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    *,
    dtype: str | None = None,
    tolerance: float | None = None,
    extra_probes: Sequence[Sequence[int]] = (),
) -> MergeCheckReport:
    """Compare the merged model's logits with base+adapter's on the probes; return the report, or
    raise `MergeCheckError` naming the numbers, the worst probe and the likely cause.

    `dtype` (default: the merged model's saved dtype) is what all three models are loaded in;
    `tolerance` (default: DEFAULT_TOLERANCE[dtype]) bounds max |diff| / RMS(reference logits).
    """
    import torch
    from peft import PeftModel

    from clusterft.hf.loading import load_model, load_tokenizer

    started = time.perf_counter()
    base, adapter, merged = Path(base_dir), Path(adapter_dir), Path(merged_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a peft adapter dir (no adapter_config.json)")
    dtype = dtype or _saved_dtype(merged)
    tolerance = default_tolerance(dtype) if tolerance is None else tolerance
    tokenizer = load_tokenizer(_tokenizer_dir(merged, adapter, base))
    probes = probe_token_ids(tokenizer, extra_probes)
    lengths = [len(ids) for ids in probes]

    # One model in memory at a time: the peak is one model, not two.
    reference_model = PeftModel.from_pretrained(load_model(base, dtype=dtype), adapter).eval()
    reference = _logits(reference_model, probes)  # (tokens, vocab)
    with reference_model.disable_adapter():
        base_only = _logits(reference_model, probes)
    del reference_model
    merged_logits = _logits(load_model(merged, dtype=dtype).eval(), probes)
    if merged_logits.shape != reference.shape:
        raise UserError(
            f"merge check: the merged model has {merged_logits.shape[-1]} logits per token, base+adapter "
            f"{reference.shape[-1]}: {merged} was not made from {base} (a different vocabulary)"
        )

    diff = (merged_logits - reference).abs()
    flat = int(diff.argmax())
    token_index = flat // diff.shape[-1]
    bounds = torch.tensor(lengths).cumsum(0)
    worst_prompt = int((bounds <= token_index).sum())
    max_abs = float(diff.max())
    rms = float(reference.pow(2).mean().sqrt())
    rel = max_abs / max(rms, 1e-12)
    report = MergeCheckReport(
        base_model=str(base.resolve()),
        adapter=str(adapter.resolve()),
        base_fingerprint=model_fingerprint(base),
        merged_fingerprint=model_fingerprint(merged),
        dtype=dtype,
        prompts=len(probes),
        tokens=sum(lengths),
        max_abs_diff=max_abs,
        logits_rms=rms,
        rel_diff=rel,
        tolerance=tolerance,
        adapter_effect=float((reference - base_only).abs().max()),
        worst_prompt=worst_prompt,
        worst_position=token_index - (int(bounds[worst_prompt - 1]) if worst_prompt else 0),
        passed=rel <= tolerance,
        seconds=round(time.perf_counter() - started, 3),
    )
    if not report.passed:
        cause = _diagnose(base, adapter, merged)
        raise MergeCheckError(_failure_message(report, probes, tokenizer, cause), report)
    return report


def _diagnose(base: Path, adapter: Path, merged: Path) -> str:
    """The likeliest cause of a failed check, from the weights (in float32): each merged tensor
    against base + that module's LoRA update (peft's own `get_delta_weight`)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from clusterft.hf.loading import load_model

    reference = PeftModel.from_pretrained(load_model(base), adapter).get_base_model()
    updates = {
        f"{name}.weight": module.get_delta_weight(module.active_adapters[0]).detach()
        for name, module in reference.named_modules()
        if isinstance(module, LoraLayer)
    }
    expected = {
        n.replace(".base_layer.", "."): t for n, t in reference.state_dict().items() if "lora_" not in n
    }
    actual = load_model(merged).state_dict()
    misses: dict[str, float] = {}  # tensor → |merged − (base + update)| / |base|
    scales: list[float] = []  # per adapted tensor: merged − base as a multiple of its update
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or got.shape != want.shape:
            shape = tuple(want.shape)
            return f"the merged model has no tensor {name} of shape {shape}: it is another architecture"
        got, update = got.float(), updates.get(name, torch.zeros(()))
        misses[name] = float((got - want - update).norm() / want.norm().clamp_min(1e-12))
        if name in updates:
            scales.append(float(((got - want) * update).sum() / update.pow(2).sum().clamp_min(1e-30)))
    off = sorted((m, n) for n, m in misses.items() if m > 1e-2)
    if not off:
        return (
            "every merged tensor equals base + update to within 1% of its norm, so precision explains the "
            "logits: the models were merged or loaded in a dtype too coarse for this adapter"
        )
    if scales and max(abs(k) for k in scales) < 1e-2:
        return (
            "the merged weights are the base's: the adapter's update is missing (merged without the adapter)"
        )
    others = [n for _, n in off if n not in updates]
    if not others and max(scales) - min(scales) < 1e-2 * max(abs(k) for k in scales):
        return (
            f"every adapted tensor of the merged model is base + {scales[0]:.3g}x the adapter's update: the "
            "scaling differs (lora_alpha / r, use_rslora changed between training and merging)"
        )
    worst, name = off[-1]
    if others:
        return (
            f"{len(off)} of {len(misses)} tensors differ from base + update, also ones the adapter does not "
            f"touch (such as {others[-1]}): the adapter was merged into another base model, or the merged "
            "files were edited"
        )
    return f"{name} differs from base + update by {worst:.3g} of its norm: the merged files were edited"


def _failure_message(report: MergeCheckReport, probes, tokenizer, cause: str) -> str:
    ids = probes[report.worst_prompt]
    context = tokenizer.decode(ids[: report.worst_position + 1])
    return (
        f"merge check failed: merged-model logits differ from base+adapter logits by "
        f"max {report.max_abs_diff:.4g} ({report.rel_diff:.3g} of the logits' RMS {report.logits_rms:.4g}; "
        f"tolerance {report.tolerance:g} for {report.dtype}), worst at probe {report.worst_prompt} "
        f"token position {report.worst_position} (text up to it: {context!r}); the adapter itself "
        f"changes the logits by up to {report.adapter_effect:.4g}.\nLikely cause: {cause}.\n"
        f"Fix: merge again from the base the adapter was trained on (`clusterft merge BASE ADAPTER "
        f"OUT`), with the adapter_config.json it was trained with; if only precision explains it, "
        f"merge and check in float32."
    )


def merge_checked(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    extra_probes: Sequence[Sequence[int]] = (),
) -> MergeCheckReport:
    """Merge into a temp dir beside `out_dir`, check it, write `merge_check.json` in it, and only
    then rename it to `out_dir`: a merge that fails the check never sits at `out_dir`."""
    from clusterft.hf.lora import merge_adapter

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; give a new output dir or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.merging-{secrets.token_hex(4)}"
    try:
        merge_adapter(base_dir, adapter_dir, staging, dtype=dtype)
        try:
            report = check_merge(base_dir, adapter_dir, staging, dtype=dtype, extra_probes=extra_probes)
        except MergeCheckError as err:
            raise MergeCheckError(f"{err}\nNothing was written to {out}.", err.report) from None
        (staging / REPORT_FILE).write_text(report.to_json(), encoding="utf-8")
        os.replace(staging, out)  # an empty `out` is replaced; a non-empty one was refused above
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report
