"""The controller's driver entry point: `python -m clusterft.cli.run_job {train,eval} --job ID
[--store DB] --out DIR` runs one phase of a job (`clusterft.controller.run_job.run_phase`), read from
the SQLite file DB, or without --store from the store `$CLUSTERFT_STORE_URL` names. The controller
starts it (`clusterft/controller/runs.py`); people do not."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from clusterft.controller.store_backend import STORE_URL_ENV
from clusterft.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    from clusterft.controller.run_job import run_phase

    parser = argparse.ArgumentParser(prog="python -m clusterft.cli.run_job")
    parser.add_argument("phase", choices=["train", "eval"])
    parser.add_argument("--job", required=True)
    parser.add_argument("--store", help=f"the job store's SQLite file (default: ${STORE_URL_ENV})")
    parser.add_argument("--out", required=True, help="this attempt's run directory")
    args = parser.parse_args(argv)
    store = args.store or os.environ.get(STORE_URL_ENV)
    if not store:
        parser.error(f"give --store DB or set ${STORE_URL_ENV}")
    return run_phase(args.phase, args.job, store, Path(args.out))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
