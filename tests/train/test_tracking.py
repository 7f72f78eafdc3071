"""`report_to`: a real training run writes its scalars through TensorBoard and MLflow, read back
with tensorboard's EventAccumulator and MLflow's client, equal to metrics.jsonl step for step."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterft.config import SpecError, parse_job_dict
from clusterft.train.export import read_metrics
from clusterft.train.launcher import run_training
from tests.train.helpers import make_job

BASE = {"model_name_or_path": "m", "dataset": "demo_tasks", "output_dir": "o"}


@pytest.mark.parametrize(
    ("value", "targets"),
    [
        ("none", []),
        ("tensorboard", ["tensorboard"]),
        ("tensorboard,mlflow", ["tensorboard", "mlflow"]),
        (["mlflow", "none"], ["mlflow"]),
        (None, []),
    ],
)
def test_report_to_takes_llamafactory_forms(value, targets) -> None:
    assert parse_job_dict({**BASE, "report_to": value}, "t").train.report_to == targets


def test_an_unsupported_tracker_is_refused_with_the_choices() -> None:
    with pytest.raises(SpecError, match="report_to: 'wandb' is not supported here; use tensorboard, mlflow"):
        parse_job_dict({**BASE, "report_to": "wandb"}, "t")


def assert_series(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """Same steps, values equal to float32 precision (TensorBoard stores float32)."""
    assert [step for step, _ in actual] == [step for step, _ in expected]
    assert [value for _, value in actual] == pytest.approx([value for _, value in expected], rel=1e-6)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_a_run_reports_to_tensorboard_and_mlflow(ray_cluster, tiny_llama, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    out = tmp_path / "out"
    spec = make_job(
        tiny_llama,
        out,
        max_steps=3,
        cluster={"num_workers": 1},
        report_to="tensorboard,mlflow",
        do_eval=True,
        eval_dataset="demo_tasks_eval",
    )
    summary = run_training(spec, show_progress=False)
    assert summary.ok, summary.error
    records = read_metrics(out / "metrics.jsonl")
    assert list(records) == [1, 2, 3]

    scalars = tensorboard_scalars(out / "runs")
    assert_series(scalars["train/loss"], [(s, r["loss"]) for s, r in records.items()])
    assert_series(scalars["train/learning_rate"], [(s, r["lr"]) for s, r in records.items()])
    assert [s for s, _ in scalars["train/tokens_per_s"]] == [1, 2, 3]
    assert_series(scalars["eval/loss"], [(3, summary.eval_metrics["eval_loss"])])

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("out", "FINISHED")
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert_series([(m.step, m.value) for m in loss], [(s, r["loss"]) for s, r in records.items()])
    for name, key in (("grad_norm", "grad_norm"), ("tokens_per_s", "tokens_per_s")):
        history = client.get_metric_history(run.info.run_id, name)
        numeric = [(s, r[key]) for s, r in records.items() if r[key] is not None]
        assert_series([(m.step, m.value) for m in history], numeric)
    eval_loss = client.get_metric_history(run.info.run_id, "eval_loss")
    assert_series([(m.step, m.value) for m in eval_loss], [(3, summary.eval_metrics["eval_loss"])])
    assert run.data.params["learning_rate"] == "0.01" and run.data.params["finetuning_type"] == "lora"


def test_without_report_to_no_tracker_files(tmp_path) -> None:
    from clusterft.train.callbacks import CallbackRunner

    spec = parse_job_dict({**BASE, "output_dir": str(tmp_path)}, "t")
    runner = CallbackRunner.for_run(spec, tmp_path)
    runner.call("on_step_end", {"step": 1, "loss": 1.0, "lr": 0.1})
    assert runner.callbacks == [] and list(tmp_path.iterdir()) == []


def test_mlflow_follows_the_tracking_uri_and_a_failed_run_says_so(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from clusterft.train.callbacks import CallbackRunner

    store = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "uri-test")
    out = tmp_path / "out"
    out.mkdir()
    spec = parse_job_dict({**BASE, "output_dir": str(out), "report_to": "mlflow"}, "t")
    runner = CallbackRunner.for_run(spec, out)
    runner.call("on_step_end", {"step": 1, "loss": 2.5, "lr": 0.1, "grad_norm": None, "tokens_per_s": 10.0})
    runner.call("on_train_end", {"status": "failed"})
    assert not (out / "mlruns").exists()
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("uri-test").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"loss": 2.5, "learning_rate": 0.1, "tokens_per_s": 10.0}


def test_an_unreachable_tracking_server_stops_the_run_with_the_fix(tmp_path, monkeypatch) -> None:
    from clusterft.errors import UserError
    from clusterft.ports import free_port
    from clusterft.train.callbacks import CallbackRunner

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spec = parse_job_dict({**BASE, "output_dir": str(tmp_path), "report_to": "mlflow"}, "t")
    with pytest.raises(UserError, match=r"report_to: mlflow could not start .*check \$MLFLOW_TRACKING_URI"):
        CallbackRunner.for_run(spec, tmp_path)
