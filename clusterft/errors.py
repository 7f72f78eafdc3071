"""Error types shared across clusterft.

A `UserError` is a mistake the user can fix (bad YAML, unknown dataset, prompt too long): the CLI
prints its message, without a traceback, and exits 2. Anything else is a bug: exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the input and the fix."""
