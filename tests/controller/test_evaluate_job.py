"""The eval phase of a job (`evaluate_job`) does what the job spec says: eval.metrics may ask for
GSM8K-style scoring (number_match) and gates use it, per_device_eval_batch_size is the batch of the
loss pass and of the engine, and the device is the one the job trains on.

The model is crafted so its greedy answer is known: every layer adds nothing to the residual stream,
one hidden dimension carries a constant, and lm_head reads only that dimension into the logit of
the token "7". Whatever the prompt, it answers "7777" in 4 tokens, on HF and on our engine alike.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from clusterft.config import JobSpec, parse_job_dict
from clusterft.controller.policy import Hold, Promote, decide_promotion, parse_gates
from clusterft.controller.run_job import evaluate_job
from clusterft.errors import UserError

# (reference, exact_match, number_match) against the answer "7777"
REFERENCES = [
    ("7777", True, True),
    ("7,777", False, True),
    ("so 7000 + 777 = 7777\n#### 7777", False, True),
    ("77", False, False),
    ("the answer is 7777.", False, True),
]


@pytest.fixture(scope="module")
def sevens_model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full model dir whose greedy answer to every prompt is "7" repeated."""
    from clusterft.hf.loading import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("sevens") / "model"
    shutil.copytree(tiny_llama, out)
    tokenizer = load_tokenizer(out)
    [seven] = tokenizer.encode("7", add_special_tokens=False)
    model = load_model(out)
    k = 0  # the hidden dimension that carries the constant
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, k] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[k] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[seven, k] = 1.0
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("digits-data")
    rows = [
        {"instruction": "repeat", "input": str(i), "output": ref} for i, (ref, _, _) in enumerate(REFERENCES)
    ]
    (data / "digits.json").write_text(json.dumps(rows), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"digits": {"file_name": "digits.json"}}))
    return data


def job(model: Path, data: Path, **overrides) -> JobSpec:
    raw = {
        "model_name_or_path": str(model),
        "finetuning_type": "full",
        "dataset": "digits",
        "dataset_dir": str(data),
        "template": "chatml",
        "output_dir": str(model),  # the eval phase reads the trained model from output_dir
        "max_steps": 1,
        "eval": {"dataset": ["digits"], "max_new_tokens": 4},
        **overrides,
    }
    return parse_job_dict(raw, "test.yaml")


@contextmanager
def forward_batches() -> Iterator[dict[str, list]]:
    """Observe every forward pass of the process: the batch of each HF forward (its embedding sees
    (B, T) token ids), the rows the engine samples per step (its lm_head sees (rows, hidden)) and the
    devices the logits are computed on."""
    seen: dict[str, list] = {"hf": [], "engine": [], "devices": []}

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, torch.nn.Embedding) and args[0].dim() == 2:
            seen["hf"].append(args[0].shape[0])
        elif type(module).__name__ == "PackedLinear" and output.dim() == 2 and output.shape[-1] == 1024:
            seen["engine"].append(output.shape[0])
        if isinstance(output, torch.Tensor):
            seen["devices"].append(output.device.type)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_number_match_is_a_job_metric_that_gates_use(sevens_model: Path, digits_data: Path) -> None:
    spec = job(
        sevens_model,
        digits_data,
        eval={"dataset": ["digits"], "max_new_tokens": 4, "metrics": ["exact_match", "number_match"]},
        promote={"gates": ["number_match >= 0.8"]},
    )
    gates = parse_gates(spec)
    result = evaluate_job(spec, sevens_model)
    metrics = result["metrics"]
    assert metrics == {"num_examples": 5, "exact_match": 0.2, "number_match": 0.8}
    samples = json.loads((sevens_model / "eval.json").read_text())["samples"]
    assert [s["prediction"] for s in samples] == ["7777"] * 5
    assert [(s["exact_match"], s["number_match"]) for s in samples] == [(e, n) for _, e, n in REFERENCES]
    assert isinstance(decide_promotion(metrics, gates, None, True), Promote)
    held = decide_promotion(metrics, ["exact_match >= 0.8"], None, True)
    assert held == Hold("not promoted: exact_match >= 0.8: got 0.2")
    # production is compared on the same metric, never exact_match against number_match
    worse = decide_promotion(metrics, gates, {"exact_match": 0.2, "number_match": 1.0}, True)
    assert worse == Hold("not promoted: number_match 0.8 is worse than production's 1")


def test_eval_batch_size_is_the_loss_batch_and_the_engine_batch(
    sevens_model: Path, digits_data: Path
) -> None:
    spec = job(sevens_model, digits_data, per_device_eval_batch_size=2)
    with forward_batches() as seen:
        metrics = evaluate_job(spec, sevens_model)["metrics"]
    assert metrics["num_examples"] == 5 and metrics["exact_match"] == 0.2
    assert seen["hf"] == [2, 2, 1]  # 5 examples in batches of 2
    # 4 tokens each for 5 prompts; at most 2 run at once, so the engine samples 2, 2, 1 rows a step
    assert max(seen["engine"]) == 2 and sum(seen["engine"]) == 5 * 4
    assert set(seen["devices"]) == {"cpu"}  # cluster.gpus_per_worker is 0: the job trains on CPU

    spec = job(sevens_model, digits_data, per_device_eval_batch_size=8)
    with forward_batches() as seen:
        evaluate_job(spec, sevens_model)
    assert seen["hf"] == [5] and max(seen["engine"]) == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_a_gpu_job_evaluates_on_cuda_or_says_why_not(sevens_model: Path, digits_data: Path) -> None:
    spec = job(sevens_model, digits_data, cluster={"gpus_per_worker": 1})
    with pytest.raises(UserError, match=r"cluster\.gpus_per_worker is 1.*no CUDA device"):
        evaluate_job(spec, sevens_model)


@pytest.mark.gpu
def test_a_gpu_job_evaluates_on_cuda(sevens_model: Path, digits_data: Path) -> None:
    spec = job(sevens_model, digits_data, cluster={"gpus_per_worker": 1}, per_device_eval_batch_size=2)
    with forward_batches() as seen:
        metrics = evaluate_job(spec, sevens_model)["metrics"]
    assert metrics["exact_match"] == 0.2 and set(seen["devices"]) == {"cuda"}
    assert seen["hf"] == [2, 2, 1] and max(seen["engine"]) == 2


def test_cli_benchmark_scores_number_match(
    sevens_model: Path, digits_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clusterft.controller.evaluate import eval_command

    common = dict(dataset_dir=str(digits_data), template="chatml", max_new_tokens=4, as_json=True)
    assert eval_command(str(sevens_model), ["digits"], benchmark=True, **common) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["number_match"] == 0.8 and "exact_match" not in results and "loss" in results
    eval_command(str(sevens_model), ["digits"], **common)
    results = json.loads(capsys.readouterr().out)
    assert results["exact_match"] == 0.2 and "number_match" not in results
