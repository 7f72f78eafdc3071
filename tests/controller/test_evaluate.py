"""Evaluation: GSM8K answer extraction, the run outcome policy, and a real evaluation of a tiny
model on the engine (loss, perplexity, exact match; eval.json next to the model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clusterft.controller.controller import training_outcome
from clusterft.controller.evaluate import EVAL_FILE, ModelRef, evaluate, final_number, numbers_match
from clusterft.controller.policy import Complete, Failure
from clusterft.data import Example
from clusterft.errors import UserError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.mark.parametrize(
    "text, number",
    [
        ("so she has 3 + 4 = 7 apples.\n#### 7", 7.0),
        ("#### 1,234", 1234.0),
        ("The answer is -12.5.", -12.5),
        ("first 3 then 18", 18.0),
        ("no number here", None),
    ],
)
def test_final_number(text: str, number: float | None) -> None:
    assert final_number(text) == number


def test_numbers_match_compares_final_numbers() -> None:
    assert numbers_match("... so 18 in total", "Janet sells 16 - 3 - 4 = 9 ... 9 * 2 = 18\n#### 18")
    assert not numbers_match("I don't know", "#### 18")
    assert not numbers_match("#### 17", "#### 18")


def test_training_outcome_never_counts_a_short_run_as_success() -> None:
    assert training_outcome({"ok": True, "planned_steps": 8, "completed_steps": 8}) == Complete(8)
    assert isinstance(training_outcome({"ok": True, "planned_steps": 8, "completed_steps": 6}), Failure)
    failed = training_outcome({"ok": False, "error": "UserError: bad", "retryable": False})
    assert failed == Failure("UserError: bad", retryable=False)


def test_evaluate_tiny_model_on_the_engine(tiny_llama: Path) -> None:
    from clusterft.data import load_examples

    examples = load_examples(["demo_tasks_eval"], EXAMPLES, max_samples=4)
    results = evaluate(ModelRef.resolve(tiny_llama), examples, template="chatml", max_new_tokens=4)
    assert results["num_examples"] == 4 and results["mode"] == "exact"
    assert math.isclose(results["perplexity"], math.exp(results["loss"]))
    assert 0.0 <= results["exact_match"] <= 1.0 and len(results["samples"]) == 4
    assert json.loads((tiny_llama / EVAL_FILE).read_text())["loss"] == results["loss"]
    (tiny_llama / EVAL_FILE).unlink()


def test_empty_eval_set_and_missing_base_are_user_errors(tmp_path: Path, tiny_llama: Path) -> None:
    with pytest.raises(UserError, match="eval set is empty"):
        evaluate(ModelRef.resolve(tiny_llama), [], template="chatml")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "hub/id"}))
    with pytest.raises(UserError, match="--base"):
        ModelRef.resolve(adapter)
    assert ModelRef.resolve(adapter, tiny_llama).adapter_dir == adapter
    assert (
        Example([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "f", 1).reference
        == "y"
    )
