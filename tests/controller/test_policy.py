"""Pure policies: resume or give up (backoff, limit, non-retryable), completion, promotion gates."""

from __future__ import annotations

import math

import pytest

from clusterft.config import SpecError
from clusterft.controller.policy import (
    MAX_BACKOFF_S,
    Complete,
    Failure,
    Gate,
    GateError,
    GiveUp,
    Hold,
    Promote,
    Resume,
    backoff_s,
    check_completion,
    decide_after_failure,
    decide_promotion,
    decide_serving,
    no_worse,
    parse_gate,
    parse_gates,
)
from clusterft.controller.state import Promoted, Registered, Serving
from clusterft.errors import UserError
from clusterft.registry.registry import AliasChange
from tests.controller.conftest import make_job, make_spec

TRANSIENT = Failure("RuntimeError: NCCL watchdog timeout")


# ---------------------------------------------------------------- resume or give up


def test_backoff_doubles_from_the_spec_until_the_limit_then_gives_up() -> None:
    spec = make_spec(failure={"max_job_restarts": 4, "backoff_s": 1.5})
    decisions = [decide_after_failure(make_job(restarts=n), TRANSIENT, spec) for n in range(5)]
    assert decisions[:4] == [
        Resume(after_s=1.5, restart=1),
        Resume(after_s=3.0, restart=2),
        Resume(after_s=6.0, restart=3),
        Resume(after_s=12.0, restart=4),
    ]
    for decision in decisions[4:]:
        assert isinstance(decision, GiveUp)
        assert "4 of 4 allowed relaunches (failure.max_job_restarts)" in decision.reason
        assert "NCCL watchdog timeout" in decision.reason
        assert "clusterft jobs resume job-20261128-091500-ab12" in decision.reason


def test_zero_restarts_allowed_gives_up_at_the_first_failure() -> None:
    spec = make_spec(failure={"max_job_restarts": 0})
    assert isinstance(decide_after_failure(make_job(), TRANSIENT, spec), GiveUp)


def test_default_spec_allows_three_relaunches_starting_at_two_seconds() -> None:
    spec = make_spec()
    assert decide_after_failure(make_job(), TRANSIENT, spec) == Resume(after_s=2.0, restart=1)
    assert isinstance(decide_after_failure(make_job(restarts=3), TRANSIENT, spec), GiveUp)


def test_backoff_is_capped() -> None:
    assert backoff_s(2.0, 1) == 2.0
    assert backoff_s(2.0, 9) == 512.0
    assert backoff_s(2.0, 10) == MAX_BACKOFF_S
    assert backoff_s(2.0, 60) == MAX_BACKOFF_S
    assert backoff_s(0.0, 5) == 0.0


@pytest.mark.parametrize(
    "error",
    [
        UserError("dataset 'demo' not found in examples/data/dataset_info.json"),
        SpecError("job.yaml", []),
        ImportError("No module named 'my_callbacks'"),
    ],
)
def test_non_retryable_errors_give_up_at_once_whatever_the_budget(error: BaseException) -> None:
    failure = Failure.from_exception(error)
    assert not failure.retryable
    assert failure.reason.startswith(type(error).__name__ + ": ")
    decision = decide_after_failure(make_job(), failure, make_spec(failure={"max_job_restarts": 10}))
    assert isinstance(decision, GiveUp)
    assert decision.reason.startswith("not retryable")


def test_ordinary_exceptions_are_retryable() -> None:
    failure = Failure.from_exception(RuntimeError("worker died"))
    assert failure == Failure("RuntimeError: worker died", retryable=True)
    assert isinstance(decide_after_failure(make_job(), failure, make_spec()), Resume)


# ---------------------------------------------------------------- completion


def test_fewer_steps_than_planned_is_a_failure_never_success() -> None:
    assert check_completion(400, 400) == Complete(400)
    early = check_completion(400, 399)
    assert early == Failure("training stopped after 399 of 400 planned steps", retryable=True)
    assert isinstance(check_completion(400, 0), Failure)


def test_more_steps_than_planned_means_the_plan_changed() -> None:
    failure = check_completion(400, 450)
    assert isinstance(failure, Failure)
    assert not failure.retryable
    assert "450 steps but 400 were planned" in failure.reason


# ---------------------------------------------------------------- gates


@pytest.mark.parametrize(
    ("text", "gate"),
    [
        ("exact_match >= 0.8", Gate("exact_match", ">=", 0.8)),
        ("eval.exact_match>=0.8", Gate("exact_match", ">=", 0.8)),
        ("  loss < 1.5 ", Gate("loss", "<", 1.5)),
        ("perplexity <= 12", Gate("perplexity", "<=", 12.0)),
        ("exact_match > .5", Gate("exact_match", ">", 0.5)),
        ("loss == 1e-3", Gate("loss", "==", 0.001)),
        ("loss < +2.5E+1", Gate("loss", "<", 25.0)),
    ],
)
def test_gates_parse(text: str, gate: Gate) -> None:
    assert parse_gate(text) == gate


@pytest.mark.parametrize(
    "text",
    [
        "exact_match => 0.8",
        "exact_match >= high",
        "exact_match >= 0.8 and loss < 1",
        "__import__('os').system('true') >= 0",
        ">= 0.8",
        "exact_match",
        "exact_match != 0.8",
        "",
    ],
)
def test_malformed_gates_are_user_errors_with_the_grammar(text: str) -> None:
    with pytest.raises(GateError) as caught:
        parse_gate(text)
    assert "write `METRIC OP NUMBER`" in str(caught.value)
    assert "e.g. 'exact_match >= 0.8'" in str(caught.value)
    assert isinstance(caught.value, UserError)


def test_unknown_metric_is_named_with_a_suggestion() -> None:
    with pytest.raises(GateError, match=r"unknown metric 'exact_mach'; did you mean 'exact_match'\?"):
        parse_gate("exact_mach >= 0.8")
    with pytest.raises(
        GateError, match=r"known: exact_match, loss, nll, nll_perplexity, number_match, perplexity"
    ):
        parse_gate("bleu >= 30")


def test_spec_gates_must_be_computed_by_evaluation() -> None:
    spec = make_spec(promote={"gates": ["exact_match >= 0.8", "loss < 2"]})
    assert parse_gates(spec) == [Gate("exact_match", ">=", 0.8), Gate("loss", "<", 2.0)]
    spec = make_spec(promote={"gates": ["exact_match >= 0.8"]}, eval={"metrics": ["loss"]})
    with pytest.raises(GateError, match=r"add it to eval\.metrics"):
        parse_gates(spec)
    spec = make_spec(promote={"gates": ["loss < 2"]}, eval={"enabled": False})
    with pytest.raises(GateError, match=r"eval\.enabled is false"):
        parse_gates(spec)


def test_a_gate_never_passes_nan() -> None:
    assert not Gate("loss", "<", 2.0).passes(math.nan)
    assert not Gate("exact_match", ">=", 0.0).passes(math.nan)


# ---------------------------------------------------------------- promotion


def test_promote_when_gates_pass_and_no_production_yet() -> None:
    decision = decide_promotion({"exact_match": 0.85, "loss": 0.4}, ["exact_match >= 0.8"], None, True)
    assert decision == Promote(
        ("exact_match >= 0.8: got 0.85", "no production version yet; nothing to compare")
    )


def test_hold_names_every_failing_gate() -> None:
    decision = decide_promotion(
        {"exact_match": 0.5, "loss": 3.0}, ["exact_match >= 0.8", "loss < 2", "perplexity < 10"], None, False
    )
    assert decision == Hold(
        "not promoted: exact_match >= 0.8: got 0.5; loss < 2: got 3; "
        "perplexity < 10: evaluation produced no perplexity"
    )


def test_boundaries_of_each_operator() -> None:
    metrics = {"exact_match": 0.8}
    assert isinstance(decide_promotion(metrics, ["exact_match >= 0.8"], None, False), Promote)
    assert isinstance(decide_promotion(metrics, ["exact_match > 0.8"], None, False), Hold)
    assert isinstance(decide_promotion(metrics, ["exact_match == 0.8"], None, False), Promote)
    assert isinstance(decide_promotion(metrics, ["exact_match <= 0.8"], None, False), Promote)
    assert isinstance(decide_promotion(metrics, ["exact_match < 0.8"], None, False), Hold)


def test_not_worse_than_production_follows_each_metrics_direction() -> None:
    gates = ["exact_match >= 0.5", "loss < 5"]
    production = {"exact_match": 0.9, "loss": 1.0}
    # Equal is not worse.
    assert isinstance(decide_promotion({"exact_match": 0.9, "loss": 1.0}, gates, production, True), Promote)
    # Better on both: higher exact_match, lower loss.
    assert isinstance(decide_promotion({"exact_match": 0.95, "loss": 0.8}, gates, production, True), Promote)
    worse_loss = decide_promotion({"exact_match": 0.95, "loss": 1.2}, gates, production, True)
    assert worse_loss == Hold("not promoted: loss 1.2 is worse than production's 1")
    worse_em = decide_promotion({"exact_match": 0.85, "loss": 0.8}, gates, production, True)
    assert worse_em == Hold("not promoted: exact_match 0.85 is worse than production's 0.9")
    # Not asked: production's numbers do not matter.
    assert isinstance(decide_promotion({"exact_match": 0.6, "loss": 4.0}, gates, production, False), Promote)


def test_production_without_the_metric_is_noted_not_held() -> None:
    decision = decide_promotion({"perplexity": 3.0}, ["perplexity < 10"], {"loss": 1.0}, True)
    assert decision == Promote(("perplexity < 10: got 3", "production has no perplexity; not compared"))


def test_no_worse_directions() -> None:
    assert no_worse("loss", 1.0, 1.0) and no_worse("loss", 0.9, 1.0) and not no_worse("loss", 1.1, 1.0)
    assert no_worse("perplexity", 2.0, 2.5) and not no_worse("perplexity", 2.6, 2.5)
    assert no_worse("exact_match", 0.8, 0.8) and no_worse("exact_match", 0.9, 0.8)
    assert not no_worse("exact_match", 0.7, 0.8)
    assert not no_worse("loss", math.nan, 1.0)


def test_bad_gate_in_decision_is_an_error_not_a_hold() -> None:
    with pytest.raises(GateError):
        decide_promotion({"exact_match": 1.0}, ["exact_match ~ 1"], None, False)


# ---------------------------------------------------------------- registered, promoted, serving

AT = "2026-11-28T09:15:00+00:00"
PROMOTED_V2 = {"production": AliasChange("production", "promote", "v0002", "v0001", AT)}
ROLLED_BACK_TO_V1 = {"production": AliasChange("production", "rollback", "v0001", "v0002", AT)}
ON_V2 = {"production": "v0002", "canary": None}
ON_V1 = {"production": "v0001", "canary": None}


def settle(state, aliases, moves, served):
    """Apply decide_serving until it holds still, as the controller's reconcile pass does."""
    path = [state]
    while (new := decide_serving(path[-1], aliases, moves, served)) is not None:
        path.append(new)
        assert len(path) <= 4, path
    return path[1:]


def test_an_alias_pointing_at_the_version_promotes_and_a_live_replica_makes_it_serving() -> None:
    registered = Registered("demo", "v0002")
    promoted = Promoted("demo", "v0002", "production", why=f"production promoted to v0002 ({AT})")
    assert decide_serving(registered, ON_V2, PROMOTED_V2, set()) == promoted
    assert decide_serving(promoted, ON_V2, PROMOTED_V2, set()) is None  # nothing serves it yet
    assert decide_serving(promoted, ON_V2, PROMOTED_V2, {"v0001"}) is None  # the old one still serves
    assert decide_serving(promoted, ON_V2, PROMOTED_V2, {"v0001", "v0002"}) == Serving(
        "demo", "v0002", "production"
    )
    assert settle(registered, ON_V2, PROMOTED_V2, {"v0002"}) == [
        promoted,
        Serving("demo", "v0002", "production"),
    ]
    assert decide_serving(Serving("demo", "v0002", "production"), ON_V2, PROMOTED_V2, {"v0002"}) is None


def test_a_rollback_sends_the_serving_job_back_to_registered_with_the_reason() -> None:
    serving = Serving("demo", "v0002", "production")
    why = f"production rolled back to v0001 ({AT})"
    assert decide_serving(serving, ON_V1, ROLLED_BACK_TO_V1, {"v0002"}) == Registered(
        "demo", "v0002", why=why
    )
    # ...and the job of the version it went back to is promoted, then serving once a replica has it.
    registered = Registered("demo", "v0001", why="production promoted to v0002")
    assert settle(registered, ON_V1, ROLLED_BACK_TO_V1, {"v0002"}) == [
        Promoted("demo", "v0001", "production", why=why)
    ]
    assert settle(registered, ON_V1, ROLLED_BACK_TO_V1, {"v0001"})[-1] == Serving(
        "demo", "v0001", "production"
    )


def test_a_job_held_by_its_gate_stays_registered_while_no_alias_points_at_it() -> None:
    held = Registered("demo", "v0003", why="not promoted: exact_match >= 0.99: got 0.5")
    assert decide_serving(held, ON_V2, PROMOTED_V2, {"v0002", "v0003"}) is None
    assert decide_serving(held, {"production": None, "canary": None}, {}, set()) is None


def test_the_last_replica_going_away_sends_serving_back_to_promoted() -> None:
    serving = Serving("demo", "v0002", "production")
    assert decide_serving(serving, ON_V2, PROMOTED_V2, set()) == Promoted(
        "demo", "v0002", "production", why="no live replica serves v0002"
    )


def test_a_job_whose_alias_moved_but_another_alias_holds_it_is_promoted_under_that_one() -> None:
    serving = Serving("demo", "v0002", "canary")
    aliases = {"production": "v0002", "canary": "v0003"}
    moves = {
        "canary": AliasChange("canary", "promote", "v0003", "v0002", AT),
        "production": AliasChange("production", "promote", "v0002", "v0001", AT),
    }
    assert settle(serving, aliases, moves, {"v0002"}) == [
        Registered("demo", "v0002", why=f"canary promoted to v0003 ({AT})"),
        Promoted("demo", "v0002", "production", why=f"production promoted to v0002 ({AT})"),
        Serving("demo", "v0002", "production"),
    ]


def test_reasons_without_a_matching_history_entry_say_where_the_alias_points() -> None:
    promoted = Promoted("demo", "v0002", "production")
    assert decide_serving(promoted, ON_V1, {}, set()) == Registered(
        "demo", "v0002", why="production points at v0001"
    )
    unset = {"production": None, "canary": None}
    assert decide_serving(promoted, unset, {}, set()) == Registered(
        "demo", "v0002", why="production points at no version"
    )


def test_without_gates_only_promote_auto_promotes() -> None:
    from clusterft.controller.policy import Hold

    held = decide_promotion({"loss": 0.4}, [], None, True)
    assert isinstance(held, Hold)
    assert held.reason.startswith("not promoted: no promote.gates, and promote.auto is false")
    assert isinstance(decide_promotion({"loss": 0.4}, [], None, True, auto=True), Promote)
    # Gates decide when there are some; `auto` does not override a failing one.
    assert isinstance(
        decide_promotion({"exact_match": 0.5}, ["exact_match >= 0.8"], None, True, auto=True), Hold
    )


def test_failed_ticks_back_off_doubling_then_end_the_process_for_a_restart() -> None:
    from clusterft.controller.policy import (
        RestartController,
        RetryTick,
        TickFailurePolicy,
        decide_after_tick_failure,
    )

    policy = TickFailurePolicy(max_consecutive=6, first_backoff_s=0.5, max_backoff_s=3.0)
    decisions = [
        decide_after_tick_failure(n, "OperationalError: disk I/O error", policy) for n in range(1, 7)
    ]
    assert decisions[:5] == [RetryTick(0.5), RetryTick(1.0), RetryTick(2.0), RetryTick(3.0), RetryTick(3.0)]
    assert decisions[5] == RestartController(
        "6 ticks in a row failed, the last with OperationalError: disk I/O error; "
        "ending the controller process so that Ray restarts it"
    )
    default = TickFailurePolicy()
    assert isinstance(decide_after_tick_failure(default.max_consecutive - 1, "x"), RetryTick)
    assert isinstance(decide_after_tick_failure(default.max_consecutive, "x"), RestartController)
    with pytest.raises(ValueError, match="max_consecutive must be at least 1"):
        TickFailurePolicy(max_consecutive=0)
