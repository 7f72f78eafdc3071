"""Job states, the data each one carries, and the transitions allowed between them.

The life of a job (issue 6):

    submitted ─► training ─► evaluating ─► registered ◄─► promoted ◄─► serving
                   │  ▲                        ▲                           │
                   ▼  │                        └───────────────────────────┘ rollback / superseded
                 failed ─► resuming
                   │          (relaunch from the newest valid checkpoint, after a backoff)
                   ▼
                 error            cancelled  (from any state before evaluation ends)

`error` and `cancelled` are where the controller stops; `jobs resume ID` moves either back to
`resuming` with a fresh restart budget. From `registered` on, a job holds a registry version and
its run is over (`SETTLED`): the controller launches nothing for it, and only the registry moves it
(`HOLDS_VERSION`). An alias pointing at its version makes it `promoted` (the controller's own
promotion or `clusterft registry promote`); a live replica serving that version (a serving record,
see serving.py) makes it `serving`; the alias moving away (rollback, another promotion) sends it
back to `registered` with the reason, and the last replica going away sends `serving` back to
`promoted`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from clusterft.errors import UserError


class JobState(StrEnum):
    SUBMITTED = "submitted"
    TRAINING = "training"
    FAILED = "failed"
    RESUMING = "resuming"
    EVALUATING = "evaluating"
    REGISTERED = "registered"
    PROMOTED = "promoted"
    SERVING = "serving"
    CANCELLED = "cancelled"
    ERROR = "error"


_S = JobState
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    _S.SUBMITTED: frozenset({_S.TRAINING, _S.CANCELLED, _S.ERROR}),
    _S.TRAINING: frozenset({_S.EVALUATING, _S.FAILED, _S.CANCELLED}),
    # Every training failure passes through `failed`, so the decision (resume or give up) is recorded.
    _S.FAILED: frozenset({_S.RESUMING, _S.ERROR, _S.CANCELLED}),
    _S.RESUMING: frozenset({_S.TRAINING, _S.FAILED, _S.CANCELLED}),
    # An evaluation crash is not retried by relaunching training: the weights are final.
    _S.EVALUATING: frozenset({_S.REGISTERED, _S.ERROR, _S.CANCELLED}),
    _S.REGISTERED: frozenset({_S.PROMOTED}),
    # Back to `registered` when the alias is rolled back or another version is promoted over it.
    _S.PROMOTED: frozenset({_S.SERVING, _S.REGISTERED}),
    # Back to `promoted` when no live replica serves the version any more.
    _S.SERVING: frozenset({_S.REGISTERED, _S.PROMOTED}),
    # A user's `jobs resume ID`.
    _S.CANCELLED: frozenset({_S.RESUMING}),
    _S.ERROR: frozenset({_S.RESUMING}),
}
"""Allowed moves; anything else raises `IllegalTransition`."""

HOLDS_VERSION: frozenset[JobState] = frozenset({_S.REGISTERED, _S.PROMOTED, _S.SERVING})
"""States of a job that registered a version; the registry's aliases and the serving records move
it between them (the controller's reconcile pass), never a launch."""

SETTLED: frozenset[JobState] = HOLDS_VERSION | {_S.CANCELLED, _S.ERROR}
"""States whose run is over: the controller launches nothing for them. A restarted controller
advances every job *not* in one of these; of these it only reconciles `HOLDS_VERSION`."""


class IllegalTransition(UserError):
    """A move the state machine does not allow, e.g. cancelling a job that is already serving."""

    def __init__(self, src: JobState, dst: JobState):
        self.src, self.dst = src, dst
        allowed = ", ".join(sorted(TRANSITIONS[src])) or "nothing"
        super().__init__(f"a job cannot move from {src} to {dst}; from {src} it can move to: {allowed}")


def check_transition(src: JobState, dst: JobState) -> None:
    """Raise `IllegalTransition` unless `src → dst` is in `TRANSITIONS`."""
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(src, dst)


# ---------------------------------------------------------------- states with their data


@dataclass(frozen=True)
class State:
    """Base of the per-state records; `kind` names the state, the fields are what it knows."""

    kind: ClassVar[JobState]

    @property
    def reason(self) -> str | None:
        """Why the job is here, for states that have a why (failures, holds, cancellations)."""
        return getattr(self, "why", None)

    def data(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Submitted(State):
    kind = _S.SUBMITTED


@dataclass(frozen=True)
class Training(State):
    kind = _S.TRAINING
    resumed_from: str | None = None
    """Checkpoint bundle this attempt started from; None for a fresh start."""


@dataclass(frozen=True)
class Failed(State):
    kind = _S.FAILED
    why: str
    retryable: bool = True


@dataclass(frozen=True)
class Resuming(State):
    kind = _S.RESUMING
    after_s: float
    """Backoff before the relaunch."""
    why: str


@dataclass(frozen=True)
class Evaluating(State):
    kind = _S.EVALUATING
    completed_steps: int


@dataclass(frozen=True)
class Registered(State):
    kind = _S.REGISTERED
    model_name: str
    version: str
    why: str | None = None
    """Why it was not promoted (a gate held it, or it was rolled back); None right after eval."""


@dataclass(frozen=True)
class Promoted(State):
    kind = _S.PROMOTED
    model_name: str
    version: str
    alias: str
    why: str | None = None
    """How the alias came to point here, or why no replica serves it any more."""


@dataclass(frozen=True)
class Serving(State):
    kind = _S.SERVING
    model_name: str
    version: str
    alias: str


@dataclass(frozen=True)
class Cancelled(State):
    kind = _S.CANCELLED
    why: str = "cancelled by the user"


@dataclass(frozen=True)
class Errored(State):
    kind = _S.ERROR
    why: str


STATE_TYPES: Mapping[JobState, type[State]] = {
    cls.kind: cls
    for cls in (
        Submitted,
        Training,
        Failed,
        Resuming,
        Evaluating,
        Registered,
        Promoted,
        Serving,
        Cancelled,
        Errored,
    )
}
assert set(STATE_TYPES) == set(JobState) == set(TRANSITIONS)


def state_from_json(kind: str, data: str) -> State:
    """Rebuild a state from the (kind, JSON) pair the store keeps."""
    return STATE_TYPES[JobState(kind)](**json.loads(data))


# ---------------------------------------------------------------- the job record


@dataclass(frozen=True)
class Job:
    """One job as the store holds it. `attempt` counts training launches (1 = the first run);
    `restarts` counts automatic relaunches since submission or the last `jobs resume`."""

    id: str
    name: str
    spec_yaml: str
    spec_hash: str
    state: State
    attempt: int
    restarts: int
    created_at: float
    updated_at: float
    result: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resumed_from: str | None = None
    spec_schema: int = 0
    """The spec schema `spec_yaml` was written under (stored_spec.py); 0: before it was stored."""

    @property
    def status(self) -> JobState:
        return self.state.kind

    @property
    def reason(self) -> str | None:
        return self.state.reason

    @property
    def settled(self) -> bool:
        return self.status in SETTLED


def next_counters(src: JobState, dst: JobState, attempt: int, restarts: int) -> tuple[int, int]:
    """(attempt, restarts) after `src → dst`: each launch is a new attempt; an automatic relaunch
    spends one restart; a user's resume (from error or cancelled) grants a fresh budget."""
    if dst is _S.TRAINING:
        attempt += 1
    if dst is _S.RESUMING:
        restarts = restarts + 1 if src is _S.FAILED else 0
    return attempt, restarts
