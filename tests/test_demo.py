"""`clusterft demo` (what `make demo` runs), end to end in a temporary work dir.

The same code path as `make demo` with fewer training steps: a real local Ray cluster, the
controller actor, 2 ZeRO-2 workers of which one is SIGKILLed, evaluation on the engine, the
registry gate, the Serve app answering through the OpenAI client, and the job reaching `serving`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "clusterft"
    proc = subprocess.run(
        [str(exe), "demo", "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-6000:]
    summary = out[out.index("step  ") :]
    assert "demo-job.yaml valid (spec hash" in summary
    assert "[[" in out and "]]" in out  # the trained-on span is marked in the preview
    baseline = float(re.search(r"exact match ([\d.]+) on \d+ held-out examples", summary).group(1))
    assert baseline <= 0.05
    killed = re.search(
        r"killed pid \d+ at step (\d+); Ray Train restarted the workers 1x, resumed from step_(\d+)", summary
    )
    assert killed, summary
    assert int(killed.group(2)) <= int(killed.group(1))  # resumed from a checkpoint before the kill
    assert "200/200 steps" in summary
    after = float(re.search(r"exact match [\d.]+ -> ([\d.]+)", summary).group(1))
    assert after >= 0.8
    assert "quickstart v0001 promoted to production" in summary
    states = "submitted -> training -> evaluating -> registered -> promoted -> serving; serving "
    assert states in summary
    answered = re.search(r"(\d+)/(\d+) answers right", summary)
    assert answered and int(answered.group(2)) == 6 and int(answered.group(1)) >= 4
    assert (tmp_path / "saves" / "quickstart" / "loss.png").is_file()
    assert f"loss plot: {tmp_path / 'saves' / 'quickstart' / 'loss.png'}" in out
