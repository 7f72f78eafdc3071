"""`clusterft train | checkpoints | merge`: argparse-ready functions that return the exit code.

Wiring (clusterft/cli/main.py):
    train JOB.yaml [--no-progress]            → train_command(args.job, progress=not args.no_progress)
    checkpoints {list,verify,prune} PATH [--keep K]
                                              → checkpoints_command(args.action, args.path, args.keep)
    merge BASE ADAPTER OUT                    → merge_command(args.base, args.adapter, args.out)
UserError propagates (the CLI prints it and exits 2); a merge that fails its check is one.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from clusterft.errors import UserError

if TYPE_CHECKING:
    from clusterft.storage import BundleStore


def train_command(job_path: str, progress: bool = True) -> int:
    """Run a job spec on Ray Train; 0 when every planned step completed, 1 otherwise."""
    from clusterft.config import load_job_spec
    from clusterft.runtime import apply_runtime_defaults
    from clusterft.train.launcher import run_training

    apply_runtime_defaults()
    spec = load_job_spec(job_path)
    summary = run_training(spec, show_progress=progress)
    print(
        f"{summary.status}: {summary.completed_steps}/{summary.planned_steps} steps, "
        f"final loss {summary.final_loss}, restarts {summary.restarts}, output {summary.output}",
        file=sys.stderr,
    )
    if summary.error:
        print(f"error: {summary.error}", file=sys.stderr)
    return 0 if summary.ok else 1


def checkpoints_command(action: str, path: str, keep: int | None = None) -> int:
    """list: step, size, validity of each bundle; verify: check every sum (exit 1 if any is invalid);
    prune: keep the newest `keep` bundles that verify (default: 1). Later runs kept in `run-XXXXXXXX`
    folders inside `path` are listed with their folder's name and pruned each on its own."""
    from clusterft.storage import BundleStore, Storage

    storage = Storage(path)
    if not storage.is_dir(""):
        raise UserError(f"{path}: no such checkpoint directory (give a run's bundles dir)")
    root = BundleStore(storage)
    runs = {_run_prefix(root, store): store for store in root.runs()}
    if action == "prune":
        deleted = [
            prefix + name
            for prefix, store in runs.items()
            for name in store.prune(keep if keep is not None else 1)
        ]
        print(json.dumps({"deleted": deleted}))
        return 0
    if action not in ("list", "verify"):
        raise UserError(f"checkpoints: unknown action {action!r}; use list, verify or prune")
    infos = [
        (prefix, info) for prefix, store in runs.items() for info in store.list(verify=action == "verify")
    ]
    for prefix, info in infos:
        state = "valid" if info.valid else f"INVALID ({info.problem})"
        print(f"{prefix}{info.name}  step {info.step:>7}  {info.size_bytes / 2**20:9.2f} MiB  {state}")
    if not infos:
        print(f"{path}: no checkpoints")
    return 0 if action == "list" or all(info.valid for _, info in infos) else 1


def _run_prefix(root: BundleStore, store: BundleStore) -> str:
    return "" if store is root else store.storage.uri.rsplit("/", 1)[1] + "/"


def merge_command(base: str, adapter: str, out: str) -> int:
    """Merge a LoRA adapter into its base model, check that the merged model's logits equal
    base+adapter's, and only then write the HF model dir (with merge_check.json) to `out`.
    A failed check raises MergeCheckError (a UserError: exit 2) and leaves nothing at `out`."""
    from clusterft.hf.merge_check import REPORT_FILE, merge_checked

    report = merge_checked(base, adapter, out)
    print(
        f"merged model written to {out}: merge check passed on {report.prompts} probes "
        f"({report.tokens} tokens), max |logit diff| {report.max_abs_diff:.3g} "
        f"({report.rel_diff:.3g} of the logits' RMS, tolerance {report.tolerance:g} for {report.dtype}) "
        f"in {report.seconds:.1f}s; report in {out}/{REPORT_FILE}",
        file=sys.stderr,
    )
    return 0
