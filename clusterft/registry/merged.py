"""Stage a merged model for registration: the controller's side of `promote.merge`.

adapter dir + base model ─► <work_dir>/merged/  (merged, checked, merge_check.json inside)
                                  │
                                  └─► Registry.register(kind="merged", merge_check=report)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from clusterft.hf.merge_check import MergeCheckReport, merge_checked


def stage_merged(
    adapter_dir: str | Path, base_model: str | Path, work_dir: str | Path
) -> tuple[Path, MergeCheckReport]:
    """Merge the adapter into its base under `work_dir` and run the merge-equivalence check.

    Returns the merged model dir and the passing report; raises `MergeCheckError` (a UserError
    naming the numbers and the likely cause) when the merge fails the check, leaving no merged dir.
    A merged dir left by an earlier, interrupted attempt is made again: merging is deterministic,
    and a fresh check is what registration trusts.
    """
    merged_dir = Path(work_dir) / "merged"
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    return merged_dir, merge_checked(base_model, adapter_dir, merged_dir)
