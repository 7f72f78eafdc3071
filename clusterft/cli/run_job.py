"""The controller's driver entry point: `python -m clusterft.cli.run_job {train,eval} --job ID
--store DB --out DIR` runs one phase of a job (`clusterft.controller.run_job.run_phase`). The
controller starts it (`clusterft/controller/runs.py`); people do not."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clusterft.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    from clusterft.controller.run_job import run_phase

    parser = argparse.ArgumentParser(prog="python -m clusterft.cli.run_job")
    parser.add_argument("phase", choices=["train", "eval"])
    parser.add_argument("--job", required=True)
    parser.add_argument("--store", required=True, help="the job store (jobs.db)")
    parser.add_argument("--out", required=True, help="this attempt's run directory")
    args = parser.parse_args(argv)
    return run_phase(args.phase, args.job, Path(args.store), Path(args.out))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
