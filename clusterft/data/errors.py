"""Dataset errors: every bad record of a run is collected and reported in one message.

A user with 3 broken lines in a 50k-line file wants to fix all three at once, before the cluster
spends a minute starting up, not one per failed launch (and not at step 500).
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterft.errors import UserError

# Enough to show the pattern of a systematic mistake without burying the terminal.
MAX_LISTED_PROBLEMS = 20


class DatasetError(UserError):
    """A dataset the user named cannot be used: unknown name, unreadable file or bad records."""


@dataclass(frozen=True)
class BadRecord:
    """One record that cannot be trained on, and why."""

    source_file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source_file}:{self.line}: {self.reason}"


def format_bad_records(problems: list[BadRecord]) -> list[str]:
    """Indented `file:line: reason` lines, sorted by file and line, the first MAX_LISTED_PROBLEMS."""
    ordered = sorted(problems, key=lambda p: (p.source_file, p.line))
    lines = [f"  {problem}" for problem in ordered[:MAX_LISTED_PROBLEMS]]
    if len(ordered) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(ordered) - MAX_LISTED_PROBLEMS} more")
    return lines


def raise_bad_records(problems: list[BadRecord]) -> None:
    """Raise one DatasetError listing `problems`; do nothing when there are none."""
    if problems:
        noun = "record" if len(problems) == 1 else "records"
        lines = format_bad_records(problems)
        raise DatasetError(f"{len(problems)} bad {noun}; fix or remove them:\n" + "\n".join(lines))
