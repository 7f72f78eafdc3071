"""The canary's eval verdict reads each metric's direction where promotion gates read it (config), so
a canary whose nll rose is rolled back, and a policy that contradicts a metric's direction is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clusterft.serve.canary import eval_verdict
from clusterft.serve.spec import CanaryPolicy


@pytest.mark.parametrize(
    "metric, production, worse, better",
    [("exact_match", 0.60, 0.50, 0.70), ("number_match", 0.4, 0.3, 0.5), ("nll", 2.0, 2.5, 1.5),
     ("perplexity", 7.0, 9.0, 6.0), ("loss", 2.0, 2.2, 1.9)],
)  # fmt: skip
def test_a_regression_is_judged_in_the_metrics_own_direction(metric, production, worse, better):
    policy = CanaryPolicy(eval_metric=metric, max_eval_regression=0.05)
    verdict = eval_verdict(policy, {metric: worse}, {metric: production})
    assert verdict is not None and metric in verdict and "worse than production" in verdict
    assert eval_verdict(policy, {metric: better}, {metric: production}) is None
    # Within the allowed regression: kept.
    step = 0.04 if metric in ("exact_match", "number_match") else -0.04
    assert eval_verdict(policy, {metric: production - step}, {metric: production}) is None


def test_a_direction_that_contradicts_the_metric_is_refused_and_the_right_one_accepted():
    with pytest.raises(ValidationError, match="contradicts nll, where lower is better"):
        CanaryPolicy(eval_metric="nll", higher_is_better=True)
    with pytest.raises(ValidationError, match="contradicts exact_match, where higher is better"):
        CanaryPolicy(eval_metric="exact_match", higher_is_better=False)
    CanaryPolicy(eval_metric="exact_match", higher_is_better=True)
    CanaryPolicy(eval_metric="nll", higher_is_better=False)


def test_a_metric_no_evaluation_computes_is_refused_with_the_known_ones():
    with pytest.raises(ValidationError, match=r"'exact_mach' is not an eval metric.*exact_match"):
        CanaryPolicy(eval_metric="exact_mach")
    assert CanaryPolicy().eval_metric is None  # no eval judgement: errors only
