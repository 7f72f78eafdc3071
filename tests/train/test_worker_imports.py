"""What a training worker process imports: every worker group start pays it again, per worker."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from clusterft.train.recipe import import_deepspeed
deepspeed = import_deepspeed()
from deepspeed.autotuning import autotuner
print("has_mlflow", autotuner.has_mlflow, "mlflow_loaded", "mlflow" in sys.modules)
import mlflow  # still importable afterwards: report_to mlflow in the same process keeps working
print("mlflow", mlflow.__name__)
"""


def test_workers_import_deepspeed_without_its_autotuners_mlflow() -> None:
    """DeepSpeed's autotuner imports mlflow (~1 CPU-s) when installed; a worker never autotunes."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "has_mlflow False mlflow_loaded False" in lines, done.stdout
    assert "mlflow mlflow" in lines, done.stdout
