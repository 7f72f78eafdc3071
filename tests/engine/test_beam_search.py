"""BeamSearchGroup holds its beams' rows until every live beam has sent one."""

import torch

from clusterft.engine.beam_search import BeamSearchGroup


def make_group(width=2):
    return BeamSearchGroup(3, width, 10, frozenset({0}), length_penalty=1.0, early_stopping=False)


def test_steps_only_once_every_live_beam_sent_its_row():
    group = make_group()
    first = torch.log_softmax(torch.tensor([0.0, 1.0, 3.0, 2.0, -1.0]), dim=-1)
    step = group.step_when_ready(["r#0"], [[]])
    assert step is None  # no row yet
    group.add_row("r#0", first)
    step = group.step_when_ready(["r#0"], [[]])
    assert (step.parents, step.token_ids, step.done) == ([0, 0], [2, 3], False)
    assert not group.rows  # rows are used once

    group.add_row("r#0", first)
    assert group.step_when_ready(["r#0", "r#1"], [[2], [3]]) is None  # r#1's row is missing
    group.drop_row("r#0")  # r#0 preempted: its row is stale, it sends a new one when recomputed
    group.add_row("r#1", first)
    assert group.step_when_ready(["r#0", "r#1"], [[2], [3]]) is None and list(group.rows) == ["r#1"]
