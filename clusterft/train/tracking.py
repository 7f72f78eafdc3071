"""Experiment tracking (`report_to: tensorboard | mlflow`): the driver's training scalars written
through the real libraries, as callbacks fed by the same progress events as metrics.jsonl.

    tensorboard  torch.utils.tensorboard event files in output_dir/runs (train/loss, train/learning_rate,
                 train/grad_norm, train/tokens_per_s, eval/loss, ...): `tensorboard --logdir output_dir/runs`
    mlflow       one run per driver attempt in $MLFLOW_TRACKING_URI, or a local file store in
                 output_dir/mlruns (experiment $MLFLOW_EXPERIMENT_NAME or "clusterft"), metrics named as
                 HF Trainer's MLflowCallback names them (loss, learning_rate, grad_norm, eval_loss, ...)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clusterft.config.spec import JobSpec
from clusterft.errors import UserError

# A step record's key → the scalar's name (HF Trainer's names, so dashboards built for it fit).
STEP_SCALARS = {
    "loss": "loss",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "tokens_per_s": "tokens_per_s",
}
DEFAULT_EXPERIMENT = "clusterft"


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric training scalars of one step record (grad_norm is None where DeepSpeed has none)."""
    return {
        name: float(record[key])
        for key, name in STEP_SCALARS.items()
        if isinstance(record.get(key), int | float)
    }


def eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """`eval_loss` → `loss` etc.: the numeric evaluation metrics, named without their prefix."""
    return {
        key.removeprefix("eval_"): float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class TensorBoardTracker:
    """Scalars as TensorBoard event files under `log_dir` (one file per driver attempt)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.last_step = 0

    def on_step_end(self, record: dict[str, Any]) -> None:
        self.last_step = int(record["step"])
        for name, value in step_scalars(record).items():
            self.writer.add_scalar(f"train/{name}", value, self.last_step)
        self.writer.flush()  # a dashboard following the run sees each step, not a buffer's worth

    def on_eval(self, metrics: dict[str, Any]) -> None:
        for name, value in eval_scalars(metrics).items():
            self.writer.add_scalar(f"eval/{name}", value, self.last_step)
        self.writer.flush()

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.writer.close()


class MlflowTracker:
    """Scalars, the training hyperparameters and the run's outcome as one MLflow run."""

    def __init__(self, spec: JobSpec, output_dir: Path):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless opted in; it is the one store that needs no
            # server or database, which is the point of a default under output_dir.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=output_dir.name)
        self.run_id = run.info.run_id
        self.last_step = 0
        params = {**spec.method.model_dump(mode="json"), **spec.train.model_dump(mode="json")}
        for key, value in params.items():
            self.client.log_param(self.run_id, key, str(value)[:500])  # MLflow's limit per value

    def on_step_end(self, record: dict[str, Any]) -> None:
        self.last_step = int(record["step"])
        for name, value in step_scalars(record).items():
            self.client.log_metric(self.run_id, name, value, step=self.last_step)

    def on_eval(self, metrics: dict[str, Any]) -> None:
        for name, value in eval_scalars(metrics).items():
            self.client.log_metric(self.run_id, f"eval_{name}", value, step=self.last_step)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        status = "FINISHED" if summary.get("status") == "succeeded" else "FAILED"
        self.client.set_terminated(self.run_id, status=status)


def make_trackers(spec: JobSpec, output_dir: Path) -> list[Any]:
    """The trackers `report_to` names, ready to take the callback hooks. One that cannot start (an
    unreachable tracking server) stops the run, as a callback that does not load does, saying which
    and how to fix it."""
    makers = {
        "tensorboard": lambda: TensorBoardTracker(output_dir / "runs"),
        "mlflow": lambda: MlflowTracker(spec, output_dir),
    }
    trackers = []
    for target in spec.train.report_to:
        try:
            trackers.append(makers[target]())
        except Exception as err:
            where = {"tensorboard": str(output_dir / "runs"), "mlflow": "$MLFLOW_TRACKING_URI"}[target]
            raise UserError(
                f"report_to: {target} could not start ({type(err).__name__}: {err}); check {where}, "
                f"or remove {target} from report_to"
            ) from err
    return trackers
