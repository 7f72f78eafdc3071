"""`clusterft checkpoints list|verify|prune` and `merge` as functions (the CLI wires them)."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest

from clusterft.cli.train import checkpoints_command
from clusterft.errors import UserError
from clusterft.storage import BundleStore
from clusterft.train.callbacks import CallbackRunner, load_callback


def make_bundles(root, steps):
    store = BundleStore(root)
    for step in steps:
        tmp = store.begin(step)
        store.put_bytes(tmp, "state/part-0.pt", b"x" * 1000)
        store.publish(tmp, step, {"global_step": step})
    return store


def test_list_verify_prune(tmp_path, capsys):
    root = tmp_path / "bundles"
    make_bundles(root, [2, 4, 6])
    (root / "step_000000006" / "state" / "part-0.pt").write_bytes(b"x" * 999 + b"y")  # same size, bad sum
    assert checkpoints_command("list", str(root)) == 0
    listed = capsys.readouterr().out
    assert "step_000000006" in listed and "INVALID" not in listed  # list checks sizes, not sums
    assert checkpoints_command("verify", str(root)) == 1
    verified = capsys.readouterr().out
    assert "step_000000006" in verified and "INVALID (state/part-0.pt: sha256 mismatch)" in verified
    # Prune checks sums: step 4 is the newest bundle that verifies, so it stays; the damaged step 6
    # is newer than it, so it stays too (it is skipped on resume); only step 2 goes.
    assert checkpoints_command("prune", str(root), keep=1) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": ["step_000000002"]}
    assert [i.name for i in BundleStore(root).list(verify=False)] == ["step_000000004", "step_000000006"]
    assert BundleStore(root).find_latest_valid().name == "step_000000004"


def test_later_runs_in_run_folders_are_listed_and_pruned_each_on_its_own(tmp_path, capsys):
    root = tmp_path / "bundles"
    make_bundles(root, [2, 4, 6])
    later = BundleStore(root).new_run()
    make_bundles(later.storage.local_path(), [1, 2, 3])
    run = later.storage.local_path().name
    assert checkpoints_command("list", str(root)) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["step_000000002", "step_000000004", "step_000000006", f"{run}/step_000000001",
                     f"{run}/step_000000002", f"{run}/step_000000003"]  # fmt: skip
    assert checkpoints_command("prune", str(root), keep=2) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": ["step_000000002", f"{run}/step_000000001"]}


def test_missing_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint directory"):
        checkpoints_command("list", str(tmp_path / "nope"))


class Recorder:
    events: ClassVar[list[str]] = []

    def on_step_end(self, metrics):
        Recorder.events.append(f"step {metrics['step']}")

    def on_train_end(self, summary):
        raise RuntimeError("a broken callback is logged, not fatal")


def test_callbacks_by_dotted_path():
    runner = CallbackRunner([f"{__name__}.Recorder"])
    runner.call("on_step_end", {"step": 3})
    runner.call("on_checkpoint", {"step": 3})  # Recorder has no such hook: skipped
    runner.call("on_train_end", {})
    assert Recorder.events == ["step 3"]
    with pytest.raises(UserError, match="cannot import"):
        load_callback("nowhere.Nothing")
    with pytest.raises(UserError, match="none of the hooks"):
        load_callback("pytest.approx")


def test_a_record_after_a_torn_line_starts_on_its_own_line(tmp_path):
    """A killed driver can cut metrics.jsonl mid-line; the next attempt's records must stay readable."""
    from clusterft.train.export import read_metrics
    from clusterft.train.launcher import ProgressTracker

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    tracker = ProgressTracker(tmp_path, CallbackRunner([]), show=False)
    tracker._on_step({"step": 2, "loss": 2.25})
    tracker.metrics_file.close()
    assert {step: record["loss"] for step, record in read_metrics(tmp_path / "metrics.jsonl").items()} == {
        1: 2.5,
        2: 2.25,
    }
