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


def hf_greedy_answers(
    model_dir: Path, examples: list[Example], template: str, max_new_tokens: int
) -> list[str]:
    """The reference: HF `generate`'s greedy answers, stopped where the engine stops (eos or the
    template's end-of-turn token)."""
    import torch

    from clusterft.data import get_template, render_prompt
    from clusterft.hf.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    stop_ids = [tokenizer.eos_token_id]
    stop_ids += [tokenizer.convert_tokens_to_ids(w) for w in get_template(template, tokenizer).stop_words]
    answers = []
    for example in examples:
        prompt = render_prompt(example.prompt_messages, template, tokenizer)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def with_reference(example: Example, reference: str) -> Example:
    messages = [*example.prompt_messages, {"role": "assistant", "content": reference}]
    return Example(messages, example.source_file, example.line)


def test_evaluate_tiny_model_on_the_engine(tiny_llama: Path) -> None:
    from clusterft.data import load_examples

    examples = load_examples(["demo_tasks_eval"], EXAMPLES, max_samples=4)
    answers = hf_greedy_answers(tiny_llama, examples, "chatml", max_new_tokens=4)
    assert len(set(answers)) > 1, answers  # the prompts get different answers: a real comparison
    # HF's own answer is the reference of examples 0 and 2; 1 and 3 expect something else.
    references = [a if i % 2 == 0 else a + " 42" for i, a in enumerate(answers)]
    scored = [with_reference(e, r) for e, r in zip(examples, references, strict=True)]
    results = evaluate(ModelRef.resolve(tiny_llama), scored, template="chatml", max_new_tokens=4)
    assert [s["prediction"] for s in results["samples"]] == answers  # the engine generates what HF does
    assert results["exact_match"] == 0.5 and results["num_examples"] == 4
    assert [s["exact_match"] for s in results["samples"]] == [True, False, True, False]
    assert math.isclose(results["perplexity"], math.exp(results["loss"]))
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
