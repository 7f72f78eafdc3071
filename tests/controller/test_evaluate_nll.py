"""Log-likelihood eval metrics scored by the engine's prompt_logprobs (`nll`, `nll_perplexity`): equal
to the HF forward's teacher-forced loss on the same tokens, for a base model and a LoRA adapter,
computed with no HF forward, and usable in promotion gates (lower is better)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clusterft.controller.evaluate import ModelRef, evaluate
from clusterft.controller.policy import Hold, Promote, decide_promotion, parse_gates
from clusterft.data import load_examples
from tests.controller.conftest import make_spec
from tests.engine.helpers import make_adapter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="module")
def examples():
    return load_examples(["demo_tasks_eval"], EXAMPLES, max_samples=6)


def hf_forwards() -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Count HF forward passes: HF's embedding sees (B, T) token ids, the engine's flat (T,) ones."""
    seen: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, torch.nn.Embedding) and args[0].dim() == 2:
            seen.append(args[0].shape[0])

    return seen, torch.nn.modules.module.register_module_forward_hook(hook)


def test_nll_equals_the_hf_loss_and_runs_no_hf_forward(tiny_llama: Path, examples) -> None:
    ref = ModelRef.resolve(tiny_llama)
    both = evaluate(ref, examples, template="chatml", metrics=("loss", "nll", "nll_perplexity"), save=False)
    assert abs(both["nll"] - both["loss"]) < 1e-4, both
    assert both["nll_perplexity"] == pytest.approx(math.exp(both["nll"]), rel=1e-12)
    seen, handle = hf_forwards()
    try:
        alone = evaluate(ref, examples, template="chatml", metrics=("nll",), save=False)
    finally:
        handle.remove()
    assert seen == []  # the engine scored it
    assert alone["nll"] == both["nll"] and set(alone) == {"num_examples", "nll", "nll_perplexity"}


def test_nll_of_a_lora_adapter_equals_its_hf_loss(tiny_llama: Path, examples, tmp_path: Path) -> None:
    adapter_dir, _ = make_adapter(tiny_llama, tmp_path / "adapter", seed=3)
    ref = ModelRef.resolve(adapter_dir, tiny_llama)
    adapted = evaluate(ref, examples, template="chatml", metrics=("loss", "nll"), save=False)
    base = evaluate(ModelRef.resolve(tiny_llama), examples, template="chatml", metrics=("nll",), save=False)
    assert abs(adapted["nll"] - adapted["loss"]) < 1e-4, adapted
    assert abs(adapted["nll"] - base["nll"]) > 1e-2  # the adapter is what was scored


def test_nll_gates_promotion_lower_is_better() -> None:
    spec = make_spec(eval={"metrics": ["nll", "nll_perplexity"]}, promote={"gates": ["nll <= 5.0"]})
    gates = parse_gates(spec)
    assert isinstance(decide_promotion({"nll": 4.0, "nll_perplexity": 54.6}, gates, None, True), Promote)
    assert decide_promotion({"nll": 6.0}, gates, None, True) == Hold("not promoted: nll <= 5: got 6")
    worse = decide_promotion({"nll": 4.0}, gates, {"nll": 3.5}, True)
    assert worse == Hold("not promoted: nll 4 is worse than production's 3.5")
