"""Pure decisions of the controller: resume or give up, did training finish, promote or hold, where
a job holding a registry version stands (registered, promoted, serving), and how to go on when a
whole tick fails.

Each function takes plain values and returns a small decision object; the controller actor only
carries the decision out. Nothing here touches Ray, the store or the filesystem.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from clusterft.config.spec import EVAL_METRICS, LOWER_IS_BETTER, JobSpec
from clusterft.controller.state import Job, Promoted, Registered, Serving
from clusterft.errors import UserError
from clusterft.registry.registry import AliasChange

MAX_BACKOFF_S = 600.0
"""Doubling stops here: with many restarts allowed, an uncapped delay would reach days."""

NON_RETRYABLE: tuple[type[BaseException], ...] = (UserError, ImportError, SyntaxError)
"""Failures that are the same on every attempt (bad spec, missing dataset, a callback that does not
import): relaunching only burns the cluster's time."""


# ---------------------------------------------------------------- after a failure


@dataclass(frozen=True)
class Failure:
    """Why a training attempt ended badly, as the controller saw it."""

    reason: str
    retryable: bool = True

    @classmethod
    def from_exception(cls, error: BaseException) -> Failure:
        return cls(f"{type(error).__name__}: {error}", retryable=not isinstance(error, NON_RETRYABLE))


@dataclass(frozen=True)
class Resume:
    after_s: float
    restart: int
    """Which automatic relaunch this is (1 = the first)."""


@dataclass(frozen=True)
class GiveUp:
    reason: str


def backoff_s(first_s: float, restart: int) -> float:
    """Delay before relaunch number `restart` (1-based): first_s, 2·first_s, 4·first_s, ... capped."""
    assert restart >= 1, restart
    return min(first_s * 2 ** (restart - 1), MAX_BACKOFF_S)


def decide_after_failure(job: Job, failure: Failure, spec: JobSpec) -> Resume | GiveUp:
    """Relaunch from the newest valid checkpoint after a backoff, unless the failure will repeat
    or the job has used `failure.max_job_restarts` relaunches."""
    if not failure.retryable:
        return GiveUp(f"not retryable, so not relaunched: {failure.reason}")
    limit = spec.failure.max_job_restarts
    if job.restarts >= limit:
        return GiveUp(
            f"failed after {job.restarts} of {limit} allowed relaunches (failure.max_job_restarts): "
            f"{failure.reason}; fix the cause, then `clusterft jobs resume {job.id}`"
        )
    restart = job.restarts + 1
    return Resume(after_s=backoff_s(spec.failure.backoff_s, restart), restart=restart)


# ---------------------------------------------------------------- did training finish


@dataclass(frozen=True)
class Complete:
    steps: int


def check_completion(planned_steps: int, completed_steps: int) -> Complete | Failure:
    """A run that stopped early is a failure (resume will finish it), never a success."""
    assert planned_steps > 0, f"planned_steps must be positive, got {planned_steps}"
    if completed_steps < planned_steps:
        return Failure(f"training stopped after {completed_steps} of {planned_steps} planned steps")
    if completed_steps > planned_steps:
        return Failure(
            f"training ran {completed_steps} steps but {planned_steps} were planned: the plan changed "
            "between attempts (dataset or batch settings?); resubmit the job",
            retryable=False,
        )
    return Complete(completed_steps)


# ---------------------------------------------------------------- promotion gates

KNOWN_METRICS = EVAL_METRICS  # the metrics evaluation can compute (the spec's list)

OPS: Mapping[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_GATE = re.compile(
    rf"^\s*(?:eval\.)?(?P<metric>[A-Za-z_]\w*)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>{_NUMBER})\s*$"
)


class GateError(UserError):
    """A promotion gate that does not parse or names a metric clusterft does not compute."""


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def passes(self, value: float) -> bool:
        """NaN never passes: a diverged model is not promoted."""
        return not math.isnan(value) and OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


def parse_gate(text: str) -> Gate:
    """`"exact_match >= 0.8"` (or `"eval.exact_match >= 0.8"`) → Gate. A regular expression, never
    eval(): a gate is data from a YAML file."""
    match = _GATE.match(text)
    if match is None:
        raise GateError(
            f"promote.gates: cannot read {text!r}; write `METRIC OP NUMBER` with OP one of "
            f"{', '.join(OPS)}, e.g. 'exact_match >= 0.8'"
        )
    metric = match["metric"]
    if metric not in KNOWN_METRICS:
        close = difflib.get_close_matches(metric, sorted(KNOWN_METRICS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise GateError(
            f"promote.gates: {text!r} names unknown metric {metric!r}{hint} "
            f"(known: {', '.join(sorted(KNOWN_METRICS))})"
        )
    return Gate(metric, match["op"], float(match["value"]))


def parse_gates(spec: JobSpec) -> list[Gate]:
    """Parse the spec's gates and check that evaluation computes each gated metric, so that a
    mistake surfaces at submission rather than after hours of training."""
    gates = [parse_gate(text) for text in spec.promote.gates]
    computed = set(spec.eval.metrics)
    for gate in gates:
        if not spec.eval.enabled:
            raise GateError(f"promote.gates: {gate} needs evaluation, but eval.enabled is false")
        if gate.metric not in computed:
            raise GateError(
                f"promote.gates: {gate} needs {gate.metric!r}, which eval.metrics ({', '.join(computed)}) "
                f"does not compute; add it to eval.metrics"
            )
    return gates


def no_worse(metric: str, candidate: float, production: float) -> bool:
    """Lower-or-equal for loss and perplexity, higher-or-equal for exact_match and number_match; NaN
    is worse."""
    if math.isnan(candidate):
        return False
    return candidate <= production if metric in LOWER_IS_BETTER else candidate >= production


@dataclass(frozen=True)
class Promote:
    notes: tuple[str, ...] = ()
    """What was checked, for the job's history."""


@dataclass(frozen=True)
class Hold:
    reason: str


def decide_promotion(
    candidate_metrics: Mapping[str, float],
    gates: Sequence[Gate | str],
    production_metrics: Mapping[str, float] | None,
    not_worse_than_production: bool,
    *,
    auto: bool = False,
) -> Promote | Hold:
    """Promote when every gate passes and, if asked, no gated metric is worse than production's.
    With no production version yet (None) the comparison is vacuous. Holds name every reason.
    Without gates nothing was checked, so only `auto` (promote.auto) promotes."""
    if not gates:
        if auto:
            return Promote(("no gates; promote.auto is true",))
        return Hold("not promoted: no promote.gates, and promote.auto is false: a version nothing checked")
    parsed = [gate if isinstance(gate, Gate) else parse_gate(gate) for gate in gates]
    problems: list[str] = []
    notes: list[str] = []
    for gate in parsed:
        value = candidate_metrics.get(gate.metric)
        if value is None:
            problems.append(f"{gate}: evaluation produced no {gate.metric}")
        elif not gate.passes(value):
            problems.append(f"{gate}: got {value:g}")
        else:
            notes.append(f"{gate}: got {value:g}")
    if not_worse_than_production and production_metrics is not None:
        for metric in dict.fromkeys(gate.metric for gate in parsed):
            value, current = candidate_metrics.get(metric), production_metrics.get(metric)
            if value is None:
                continue  # already a problem above
            if current is None:
                notes.append(f"production has no {metric}; not compared")
            elif no_worse(metric, value, current):
                notes.append(f"{metric} {value:g} is not worse than production's {current:g}")
            else:
                problems.append(f"{metric} {value:g} is worse than production's {current:g}")
    elif not_worse_than_production:
        notes.append("no production version yet; nothing to compare")
    if problems:
        return Hold("not promoted: " + "; ".join(problems))
    return Promote(tuple(notes))


# ---------------------------------------------------------------- registered, promoted, serving

VersionState = Registered | Promoted | Serving


def decide_serving(
    state: VersionState,
    aliases: Mapping[str, str | None],
    last_moves: Mapping[str, AliasChange],
    served_versions: Collection[str],
) -> VersionState | None:
    """The next state of a job holding a registry version, or None where it already belongs.

    `aliases` is where each alias of the job's model points now, `last_moves` each alias's latest
    move (for the reason), `served_versions` the versions some live replica serves. One move at a
    time (the caller repeats until None), each a transition of the state machine:

        registered ─► promoted   an alias points at the version (first in `aliases` order)
        promoted   ─► serving    and a live replica serves it
        promoted/serving ─► registered   the job's alias moved away (rollback, another promotion)
        serving    ─► promoted   no live replica serves it any more
    """
    holders = [alias for alias, target in aliases.items() if target == state.version]
    if isinstance(state, Registered):
        if not holders:
            return None
        alias = holders[0]
        return Promoted(state.model_name, state.version, alias, why=_moved(alias, aliases, last_moves))
    if state.alias not in holders:
        return Registered(state.model_name, state.version, why=_moved(state.alias, aliases, last_moves))
    served = state.version in served_versions
    if isinstance(state, Promoted):
        return Serving(state.model_name, state.version, state.alias) if served else None
    if not served:
        return Promoted(
            state.model_name, state.version, state.alias, why=f"no live replica serves {state.version}"
        )
    return None


def _moved(alias: str, aliases: Mapping[str, str | None], last_moves: Mapping[str, AliasChange]) -> str:
    """`production rolled back to v0001 (2026-11-28T09:15:00+00:00)`: the alias's latest move."""
    target = aliases.get(alias)
    change = last_moves.get(alias)
    if target is None:
        return f"{alias} points at no version"
    if change is None or change.version != target:
        return f"{alias} points at {target}"
    verb = "rolled back" if change.action == "rollback" else "promoted"
    return f"{alias} {verb} to {target} ({change.at})"


# ---------------------------------------------------------------- a tick that fails


@dataclass(frozen=True)
class TickFailurePolicy:
    """How the controller's loop answers ticks that fail as a whole (the store unreadable or locked):
    it retries after a doubling backoff, and after `max_consecutive` failures in a row it ends its
    process, so that Ray restarts the actor (`max_restarts=-1`) with fresh connections and state."""

    max_consecutive: int = 10
    first_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {self.max_consecutive}")
        if not 0 < self.first_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < first_backoff_s <= max_backoff_s, got {self.first_backoff_s}, {self.max_backoff_s}"
            )


TICK_FAILURES = TickFailurePolicy()
"""The controller's: 10 failures in a row, 0.5 s doubling to 30 s between them (2 minutes of waits)."""


@dataclass(frozen=True)
class RetryTick:
    after_s: float


@dataclass(frozen=True)
class RestartController:
    reason: str


def decide_after_tick_failure(
    consecutive: int, error: str, policy: TickFailurePolicy = TICK_FAILURES
) -> RetryTick | RestartController:
    """After the `consecutive`-th failed tick in a row (1-based) that failed with `error`."""
    assert consecutive >= 1, consecutive
    if consecutive >= policy.max_consecutive:
        return RestartController(
            f"{consecutive} ticks in a row failed, the last with {error}; ending the controller process "
            "so that Ray restarts it"
        )
    return RetryTick(min(policy.first_backoff_s * 2 ** (consecutive - 1), policy.max_backoff_s))
