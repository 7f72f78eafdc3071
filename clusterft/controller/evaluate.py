"""Evaluate a trained model or adapter: teacher-forced loss and perplexity on an eval set (HF forward
pass, torch), the same log-likelihood scored by clusterft's engine (`nll`, `nll_perplexity`: its
prompt_logprobs over each whole example, as an eval harness scores through the serving API), and
accuracy from greedy generation on the engine (never HF `generate`).

Two scores of the generated answers, each a metric of its own (eval.metrics, gates):
    exact_match   the demo task's metric: the answer equals the reference up to whitespace
    number_match  benchmark files in GSM8K style: the final number of the answer ("#### 42", or the
                  last number in the text) equals the reference's final number
Both come from the same generations, so asking for both costs one generation pass.

Results are written as JSON next to the model (`eval.json`), so the registry and the CLI read the
same numbers the controller gated on.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clusterft.data import Example, exact_match
from clusterft.data.preprocess import IGNORE_INDEX, EncodedExample
from clusterft.errors import UserError

EVAL_FILE = "eval.json"
Device = Literal["cpu", "cuda"]
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


@dataclass(frozen=True)
class ModelRef:
    """What to evaluate: a full HF model dir, or a peft adapter dir with the base it applies to."""

    model_dir: Path
    adapter_dir: Path | None = None

    @classmethod
    def resolve(cls, path: str | Path, base_model: str | Path | None = None) -> ModelRef:
        """A model dir as is; an adapter dir (adapter_config.json) with `base_model`, or else the
        base recorded in the adapter's config."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: no such model or adapter directory")
        config = path / "adapter_config.json"
        if not config.is_file():
            return cls(path)
        base = base_model or json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise UserError(
                f"{path} is an adapter whose base model {base!r} is not a local directory; "
                "give the base with --base DIR"
            )
        return cls(Path(base), path)

    @property
    def tokenizer_dir(self) -> Path:
        adapter = self.adapter_dir
        return (
            adapter
            if adapter is not None and (adapter / "tokenizer_config.json").is_file()
            else self.model_dir
        )

    @property
    def output_dir(self) -> Path:
        """Where eval.json goes: next to the weights that were evaluated."""
        return self.adapter_dir or self.model_dir


def final_number(text: str) -> float | None:
    """GSM8K's answer: the number after `####` if there is one, else the last number in the text."""
    match = _FINAL.search(text)
    found = match.group(1) if match else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    try:
        return float(found.replace(",", "").rstrip("."))
    except ValueError:
        return None


def numbers_match(prediction: str, reference: str) -> bool:
    """GSM8K scoring: both final numbers exist and are equal."""
    predicted, expected = final_number(prediction), final_number(reference)
    return predicted is not None and expected is not None and math.isclose(predicted, expected)


SCORES: dict[str, Callable[[str, str], bool]] = {"exact_match": exact_match, "number_match": numbers_match}
"""The generation metrics: each scores (prediction, reference)."""


def evaluate(
    ref: ModelRef,
    examples: Sequence[Example],
    *,
    template: str,
    cutoff_len: int = 1024,
    max_new_tokens: int = 32,
    metrics: Sequence[str] = ("loss", "perplexity", "exact_match"),
    batch_size: int = 8,
    device: Device = "cpu",
    save: bool = True,
) -> dict[str, Any]:
    """Score `ref` on `examples` on `device`, `batch_size` examples at a time (the loss pass's batch
    and the engine's running requests); returns (and with `save`, writes to eval.json next to the
    model) `loss`, `perplexity`, `nll`, `nll_perplexity`, `exact_match` and `number_match` as asked,
    plus `num_examples`."""
    if not examples:
        raise UserError("nothing to evaluate: the eval set is empty (set eval.dataset or val_size)")
    from clusterft.hf.loading import load_tokenizer

    tokenizer = load_tokenizer(ref.tokenizer_dir)
    results: dict[str, Any] = {"num_examples": len(examples)}
    likelihood = {"loss", "perplexity", "nll", "nll_perplexity"} & set(metrics)
    encoded = encode_for_scoring(examples, tokenizer, template, cutoff_len) if likelihood else []
    if "loss" in metrics or "perplexity" in metrics:
        loss = teacher_forced_loss(ref, encoded, tokenizer.pad_token_id, batch_size, device)
        results["loss"] = loss
        results["perplexity"] = _perplexity(loss)
    if "nll" in metrics or "nll_perplexity" in metrics:
        nll = engine_nll(ref, encoded, batch_size, device)
        results["nll"] = nll
        results["nll_perplexity"] = _perplexity(nll)
    scores = {name: score for name, score in SCORES.items() if name in metrics}
    if scores:
        predictions = generate_answers(ref, examples, tokenizer, template, max_new_tokens, batch_size, device)
        hits = {
            name: [score(p, e.reference) for p, e in zip(predictions, examples, strict=True)]
            for name, score in scores.items()
        }
        results.update({name: sum(h) / len(h) for name, h in hits.items()})
        results["samples"] = [
            {"reference": e.reference, "prediction": p, **{name: h[i] for name, h in hits.items()}}
            for i, (e, p) in enumerate(zip(examples[:5], predictions[:5], strict=True))
        ]
    if save:
        (ref.output_dir / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def teacher_forced_loss(
    ref: ModelRef, encoded: list[EncodedExample], pad_token_id: int, batch_size: int, device: Device = "cpu"
) -> float:
    """Mean cross-entropy per answer token (the tokens training is scored on), over every example,
    from HF forward passes of `batch_size` examples on `device`."""
    import torch

    from clusterft.data import collate

    model = _load_hf(ref).to(device)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Token t predicts token t+1: shift so logits[:, t] is scored against labels[:, t+1].
            labels = batch["labels"][:, 1:]
            per_token = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            total += per_token.item()
            count += int((labels != -100).sum())
    del model
    _release_device_memory(device)
    return total / max(count, 1)


def _release_device_memory(device: Device) -> None:
    """The engine that runs next sizes its KV cache from free memory: return what this pass held."""
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def engine_nll(
    ref: ModelRef, encoded: list[EncodedExample], batch_size: int, device: Device = "cpu"
) -> float:
    """Mean negative log-likelihood per answer token (the tokens teacher_forced_loss scores), from
    the engine's prompt_logprobs over each whole encoded example: the log-likelihood an eval harness
    gets through the serving API (completions with echo and max_tokens 0), with no HF forward."""
    from clusterft.engine import SamplingParams

    llm, lora_name = _engine(ref, batch_size, device)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)  # the one token is unused
    outputs = llm.generate([e.input_ids for e in encoded], params, lora_name=lora_name)
    total, count = 0.0, 0
    for example, out in zip(encoded, outputs, strict=True):
        assert out.prompt_logprobs is not None
        # Entry p scores token p given tokens < p: the same pairs as the loss's shifted labels.
        for pos in range(1, len(example.input_ids)):
            if example.labels[pos] != IGNORE_INDEX:
                total -= out.prompt_logprobs[pos][example.input_ids[pos]].logprob
                count += 1
    del llm
    _release_device_memory(device)
    return total / max(count, 1)


def _perplexity(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


def encode_for_scoring(
    examples: Sequence[Example], tokenizer: Any, template: str, cutoff_len: int
) -> list[EncodedExample]:
    """The examples as training encodes them (template, cutoff, answer-only labels)."""
    from clusterft.config.spec import DataArgs
    from clusterft.data.builder import encode_data

    data = DataArgs(dataset=["eval"], template=template, cutoff_len=cutoff_len)
    encoded = encode_data(data, tokenizer, list(examples))
    if encoded.problems:
        raise UserError(f"{len(encoded.problems)} eval examples cannot be scored: {encoded.problems[0]}")
    return encoded.encoded


def _engine(ref: ModelRef, batch_size: int, device: Device) -> tuple[Any, str | None]:
    """clusterft's engine over `ref` (an adapter loaded as the LoRA "candidate") and the lora name."""
    from clusterft.engine import LLM

    lora = (("candidate", str(ref.adapter_dir)),) if ref.adapter_dir is not None else ()
    llm = LLM(ref.model_dir, lora_modules=lora, max_num_seqs=batch_size, device=device)
    return llm, "candidate" if lora else None


def _load_hf(ref: ModelRef) -> Any:
    from clusterft.hf.loading import load_model

    model = load_model(ref.model_dir)
    if ref.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ref.adapter_dir)
    model.eval()
    return model


def generate_answers(
    ref: ModelRef,
    examples: Sequence[Example],
    tokenizer: Any,
    template: str,
    max_new_tokens: int,
    batch_size: int = 8,
    device: Device = "cpu",
) -> list[str]:
    """Greedy answers from clusterft's engine on `device`, at most `batch_size` requests running at
    once, in example order (the adapter loaded as a LoRA)."""
    from clusterft.data import get_template, render_prompt
    from clusterft.engine import SamplingParams

    llm, lora_name = _engine(ref, batch_size, device)
    stop = get_template(template, tokenizer).stop_words
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=tuple(stop))
    prompts = [render_prompt(e.prompt_messages, template, tokenizer) for e in examples]
    outputs = llm.generate(prompts, params, lora_name=lora_name)
    return [out.outputs[0].text for out in outputs]


def load_eval_examples(
    names: Sequence[str], dataset_dir: str | Path, max_samples: int | None = None
) -> list[Example]:
    """Examples of registered datasets, for `clusterft eval --dataset NAME`."""
    from clusterft.data import load_examples

    return load_examples(list(names), dataset_dir, max_samples=max_samples)


def eval_command(
    model: str,
    dataset: Sequence[str],
    *,
    dataset_dir: str = "data",
    template: str = "default",
    max_samples: int | None = None,
    max_new_tokens: int = 32,
    benchmark: bool = False,
    base: str | None = None,
    as_json: bool = False,
) -> int:
    """`clusterft eval MODEL_OR_ADAPTER --dataset NAME`: print the metrics; write eval.json next to
    the model. Exit 0 (a score is a result, not an error)."""
    from clusterft.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    ref = ModelRef.resolve(model, base)
    examples = load_eval_examples(dataset, dataset_dir, max_samples)
    results = evaluate(
        ref,
        examples,
        template=template,
        max_new_tokens=max_new_tokens,
        metrics=("loss", "perplexity", "number_match" if benchmark else "exact_match"),
    )
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        shown = {k: v for k, v in results.items() if isinstance(v, int | float)}
        print("  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        print(f"wrote {ref.output_dir / EVAL_FILE}", file=sys.stderr)
    return 0
