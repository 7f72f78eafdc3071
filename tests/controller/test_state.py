"""The job state machine: every allowed move, illegal moves named, counters, state round-trips."""

from __future__ import annotations

import itertools
import json

import pytest

from clusterft.controller.state import (
    HOLDS_VERSION,
    SETTLED,
    STATE_TYPES,
    TRANSITIONS,
    Cancelled,
    Errored,
    Evaluating,
    Failed,
    IllegalTransition,
    JobState,
    Promoted,
    Registered,
    Resuming,
    Serving,
    Submitted,
    Training,
    check_transition,
    next_counters,
    state_from_json,
)
from clusterft.errors import UserError

S = JobState
ALLOWED = sorted((src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts)
ILLEGAL = sorted((src, dst) for src in S for dst in S if dst not in TRANSITIONS[src])


def test_the_lifecycle_of_the_issue_is_a_path_through_the_machine() -> None:
    path = [S.SUBMITTED, S.TRAINING, S.FAILED, S.RESUMING, S.TRAINING, S.FAILED, S.RESUMING, S.TRAINING]
    path += [S.EVALUATING, S.REGISTERED, S.PROMOTED, S.SERVING, S.REGISTERED, S.PROMOTED]
    path += [S.SERVING, S.PROMOTED, S.REGISTERED]
    for src, dst in itertools.pairwise(path):
        check_transition(src, dst)


def test_the_transition_table_is_exactly_this() -> None:
    # Pinned: widening the machine must be a deliberate edit here too.
    assert {src: sorted(dsts) for src, dsts in TRANSITIONS.items()} == {
        S.SUBMITTED: [S.CANCELLED, S.ERROR, S.TRAINING],
        S.TRAINING: [S.CANCELLED, S.EVALUATING, S.FAILED],
        S.FAILED: [S.CANCELLED, S.ERROR, S.RESUMING],
        S.RESUMING: [S.CANCELLED, S.FAILED, S.TRAINING],
        S.EVALUATING: [S.CANCELLED, S.ERROR, S.REGISTERED],
        S.REGISTERED: [S.PROMOTED],
        S.PROMOTED: [S.REGISTERED, S.SERVING],
        S.SERVING: [S.PROMOTED, S.REGISTERED],
        S.CANCELLED: [S.RESUMING],
        S.ERROR: [S.RESUMING],
    }
    assert len(ALLOWED) == 22


@pytest.mark.parametrize(("src", "dst"), ALLOWED)
def test_every_allowed_transition_passes(src: JobState, dst: JobState) -> None:
    check_transition(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.SUBMITTED, S.EVALUATING),  # skipping training
        (S.SUBMITTED, S.SERVING),
        (S.TRAINING, S.REGISTERED),  # skipping evaluation
        (S.TRAINING, S.TRAINING),
        (S.FAILED, S.TRAINING),  # a relaunch is always decided (resuming) first
        (S.EVALUATING, S.PROMOTED),  # skipping the registry
        (S.SERVING, S.CANCELLED),
        (S.REGISTERED, S.CANCELLED),
        (S.CANCELLED, S.TRAINING),
        (S.ERROR, S.SERVING),
    ],
)
def test_illegal_transitions_name_both_states_and_the_way_out(src: JobState, dst: JobState) -> None:
    with pytest.raises(IllegalTransition) as caught:
        check_transition(src, dst)
    message = str(caught.value)
    assert f"from {src} to {dst}" in message
    for allowed in TRANSITIONS[src]:
        assert str(allowed) in message.split("can move to:")[1]
    assert isinstance(caught.value, UserError)


def test_every_illegal_pair_raises() -> None:
    assert len(ILLEGAL) == len(S) ** 2 - len(ALLOWED)
    for src, dst in ILLEGAL:
        with pytest.raises(IllegalTransition):
            check_transition(src, dst)


def test_settled_states_are_where_the_controller_stops() -> None:
    assert {S.REGISTERED, S.PROMOTED, S.SERVING, S.CANCELLED, S.ERROR} == SETTLED
    # The registry alone moves a job that holds a version: among themselves, never to a run.
    assert {S.REGISTERED, S.PROMOTED, S.SERVING} == HOLDS_VERSION
    for src in HOLDS_VERSION:
        assert TRANSITIONS[src] <= HOLDS_VERSION, src
    # Everything unsettled can still end: it reaches a settled state.
    for start in set(S) - SETTLED:
        seen, frontier = {start}, [start]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen & SETTLED, start


@pytest.mark.parametrize(
    "state",
    [
        Submitted(),
        Training(resumed_from="ckpt/checkpoint_000050"),
        Failed("RuntimeError: NCCL timeout", retryable=True),
        Resuming(after_s=4.0, why="RuntimeError: NCCL timeout"),
        Evaluating(completed_steps=400),
        Registered("demo", "v0002", why="exact_match 0.5 < 0.8"),
        Promoted("demo", "v0002", "production"),
        Promoted("demo", "v0002", "production", why="production rolled back to v0002"),
        Serving("demo", "v0002", "production"),
        Cancelled(),
        Errored("gave up"),
    ],
)
def test_states_carry_their_data_and_round_trip_through_json(state: object) -> None:
    assert isinstance(state, STATE_TYPES[state.kind])  # type: ignore[attr-defined]
    again = state_from_json(str(state.kind), json.dumps(state.data()))  # type: ignore[attr-defined]
    assert again == state


def test_reason_is_the_why_of_states_that_have_one() -> None:
    assert Failed("boom").reason == "boom"
    assert Cancelled().reason == "cancelled by the user"
    assert Registered("demo", "v0001").reason is None
    assert Training().reason is None


def test_counters_count_launches_and_automatic_restarts() -> None:
    assert next_counters(S.SUBMITTED, S.TRAINING, 0, 0) == (1, 0)
    assert next_counters(S.TRAINING, S.FAILED, 1, 0) == (1, 0)
    assert next_counters(S.FAILED, S.RESUMING, 1, 0) == (1, 1)
    assert next_counters(S.RESUMING, S.TRAINING, 1, 1) == (2, 1)
    assert next_counters(S.FAILED, S.RESUMING, 2, 1) == (2, 2)
    # A user's resume after the job gave up (or was cancelled) grants a fresh restart budget.
    assert next_counters(S.ERROR, S.RESUMING, 4, 3) == (4, 0)
    assert next_counters(S.CANCELLED, S.RESUMING, 2, 1) == (2, 0)
    assert next_counters(S.EVALUATING, S.REGISTERED, 2, 1) == (2, 1)
