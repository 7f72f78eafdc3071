"""User callbacks, named by dotted path in the spec (`callbacks: [mypkg.hooks.Notify]`), plugin-style.

A callback is a class (instantiated once, with no arguments) or any object with some of the hooks
    on_step_end(metrics)        after each optimizer step: step, loss, lr, grad_norm, tokens_per_s, ...
    on_checkpoint(info)         after a bundle is published: step, name, bytes, seconds
    on_eval(metrics)            after evaluation
    on_train_end(summary)       once, with run_summary.json's content
They run in the driver, fed by the workers' progress events, so a slow hook never stalls training.
The experiment trackers of `report_to` (train/tracking.py) are callbacks too, after the user's.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clusterft.config.spec import JobSpec
from clusterft.errors import UserError

logger = logging.getLogger(__name__)
HOOKS = ("on_step_end", "on_checkpoint", "on_eval", "on_train_end")


def load_callback(path: str) -> Any:
    """Import `package.module.Name`; a class is instantiated. UserError names what is wrong."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise UserError(f"callbacks: {path!r} is not a dotted path like mypkg.hooks.MyCallback")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"callbacks: cannot import {path!r}: {err}") from None
    callback = target() if inspect.isclass(target) else target
    if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
        raise UserError(f"callbacks: {path!r} has none of the hooks {', '.join(HOOKS)}")
    return callback


class CallbackRunner:
    """Calls each hook on every callback that has it; a failing callback is logged, not fatal."""

    def __init__(self, paths: list[str], trackers: Sequence[Any] = ()):
        self.callbacks = [load_callback(path) for path in paths] + list(trackers)

    @classmethod
    def for_run(cls, spec: JobSpec, output_dir: Path) -> CallbackRunner:
        """The spec's callbacks, then the experiment trackers its `report_to` names."""
        from clusterft.train.tracking import make_trackers

        return cls(spec.callbacks, make_trackers(spec, output_dir))

    def call(self, hook: str, payload: dict[str, Any]) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if callable(method):
                try:
                    method(payload)
                except Exception:
                    logger.exception("callback %s.%s failed", type(callback).__name__, hook)
