"""Turn a training bundle into ecosystem artifacts: a peft adapter dir or an HF model dir, and loss.png."""

from __future__ import annotations

import json
from pathlib import Path

from clusterft.config.spec import JobSpec
from clusterft.storage import BundleStore


def export_bundle(spec: JobSpec, base_dir: str, store: BundleStore, name: str, output_dir: Path) -> Path:
    """Rebuild the model as the workers did, load the bundle's trainable weights, save to `output_dir`.

    The weights are consolidated once, here, streaming: each shard in turn is copied into the
    model's parameters (no second full copy of the weights, one shard read at a time).

    LoRA: adapter_config.json + adapter_model.safetensors (loadable by `PeftModel.from_pretrained`);
    full / freeze: an HF model dir. The tokenizer is saved alongside in both cases.
    """
    from clusterft.hf.loading import load_model, load_tokenizer
    from clusterft.hf.lora import apply_method, save_trained
    from clusterft.train.checkpointing import load_bundle, read_shards
    from clusterft.train.recipe import resolve
    from clusterft.train.state import load_weights, seed_everything

    model_dir = resolve(base_dir, spec.model.model_name_or_path)
    seed_everything(spec.train.seed)
    model = apply_method(load_model(model_dir), spec.method, spec.model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    load_weights(trainable, read_shards(load_bundle(store, name, rank=0)))
    return save_trained(model, output_dir, load_tokenizer(model_dir))


def evaluate_loss(spec: JobSpec, base_dir: str, output_dir: Path) -> dict[str, float] | None:
    """Token-mean loss and perplexity of the exported model on the eval split (None if it is empty).

    Runs in the driver after training (`do_eval: true`); generation metrics such as exact match are
    the evaluation stage's job.
    """
    import math

    import torch
    import torch.nn.functional as F

    from clusterft.data import IGNORE_INDEX, build_datasets, collate
    from clusterft.hf.loading import load_model, load_tokenizer
    from clusterft.train.recipe import resolve

    model_dir = resolve(base_dir, spec.model.model_name_or_path)
    tokenizer = load_tokenizer(model_dir)
    evaluation = build_datasets(spec.data, tokenizer, seed=spec.train.seed, base_dir=base_dir).eval
    if not evaluation:
        return None
    if (output_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(model_dir), output_dir)
    else:
        model = load_model(output_dir)
    model.eval()
    total, count = 0.0, 0
    size = spec.train.per_device_eval_batch_size
    with torch.no_grad():
        for start in range(0, len(evaluation), size):
            batch = collate(evaluation[start : start + size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:].reshape(-1)
            total += float(
                F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels, reduction="sum")
            )
            count += int((labels != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_examples": len(evaluation)}


def read_metrics(metrics_path: Path) -> dict[int, dict]:
    """step → the last record of that step (steps re-run after a restart overwrite the earlier ones).

    A line that is not a record is skipped: lines are appended without fsync, so a killed driver
    can leave half of one (and the next attempt appends to it). Said once per file and lines, as a
    RuntimeWarning (Python shows each distinct warning once), not at every read of a poll."""
    import warnings

    records: dict[int, dict] = {}
    skipped: list[int] = []
    if metrics_path.is_file():
        lines = metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = record["step"]
            except (ValueError, TypeError, KeyError):
                skipped.append(number)
                continue
            if isinstance(step, int):
                records[step] = record
            else:
                skipped.append(number)
    if skipped:
        warnings.warn(
            f"{metrics_path}: skipped line(s) {', '.join(map(str, skipped))}, not a metrics record "
            "(torn by a killed writer?)",
            RuntimeWarning,
            stacklevel=2,
        )
    return dict(sorted(records.items()))


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss by step (matplotlib, Agg backend: no display needed)."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(records), [r["loss"] for r in records.values()], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
