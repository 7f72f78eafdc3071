"""What every benchmark script shares."""

from __future__ import annotations

import os
import sys
from typing import TextIO


def result_stream(argv: list[str]) -> TextIO:
    """Where the result goes. With --json, stdout carries the JSON alone, so `... --json | jq` works:
    fd 1 is pointed at stderr for everything else (DeepSpeed's and Ray's log lines, also those of
    child processes, which inherit the fds), and the returned stream writes to the real stdout. Call
    it before importing torch, DeepSpeed or Ray: they log at import."""
    if "--json" not in argv:
        return sys.stdout
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return out
