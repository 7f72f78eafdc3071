"""`clusterft demo` (what `make demo` runs), end to end in a temporary work dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "clusterft"
    proc = subprocess.run(
        [str(exe), "demo", "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert (tmp_path / "models" / "tiny-llama" / "model.safetensors").is_file()
    assert "demo-job.yaml valid (spec hash" in out
    assert "[[" in out and "]]" in out  # the trained-on span is marked in the preview
    assert out.rstrip().splitlines()[-1].startswith("preview its training data")  # summary table ends the run
