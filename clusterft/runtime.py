"""Process-wide defaults for running clusterft on a laptop or a cluster.

Set before Ray, DeepSpeed or transformers are imported, and inherited by the local Ray cluster's
workers (they are forked from this process's environment). Values already set by the user win.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

_DEFAULTS = {
    # Ray 2.60 turns on token auth and writes ~/.ray/auth_token unless told otherwise.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray Train V2 polls workers at this interval; its 2 s default makes each report() cost 2 s.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # No hub is reachable: models and tokenizers load from local directories only.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Weight-loading progress bars for 1 MB models are noise in logs and the demo.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TORCH_EXTENSIONS_DIR": str(PROJECT_ROOT / ".cache" / "torch_extensions"),
}


def apply_runtime_defaults() -> None:
    """Fill in environment defaults that the user has not set, and put the venv's bin first on PATH."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    # torch's extension builder runs the first `ninja` on PATH; the venv's must win or the
    # DeepSpeed op is rebuilt whenever the two alternate.
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if not path.startswith(venv_bin + os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + path
