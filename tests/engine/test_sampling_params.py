"""SamplingParams refuses every out-of-range field at construction, naming the field and its range."""

import math

import pytest

from clusterft.engine import SamplingParams

BAD_FIELDS = [
    ({"n": 0}, r"n must be an integer >= 1, got 0"),
    ({"n": 1.5}, r"n must be an integer >= 1, got 1.5"),
    ({"n": 2, "best_of": 1}, r"best_of \(1\) must be >= n \(2\)"),
    ({"temperature": -0.1}, r"temperature must be a finite number >= 0 \(0 is greedy\), got -0.1"),
    ({"temperature": math.nan}, r"temperature must be a finite number >= 0"),
    ({"temperature": math.inf}, r"temperature must be a finite number >= 0"),
    ({"top_k": -2}, r"top_k must be an integer, -1 or 0 \(off\) or >= 1, got -2"),
    ({"top_k": 2.0}, r"top_k must be an integer"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": math.nan}, r"top_p must be in \(0, 1\]"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be a finite number > 0 \(1 is off\)"),
    ({"repetition_penalty": math.nan}, r"repetition_penalty must be a finite number > 0"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\], got -3"),
    (
        {"seed": 2**63},
        r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 1\] or None, got 9223372036854775808",
    ),
    ({"seed": 2**64 - 1, "n": 2}, r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 1\]"),
    ({"seed": -(2**63) - 1}, r"seed must be an integer in"),
    ({"seed": 1.0}, r"seed must be an integer in"),
    ({"max_tokens": 0}, r"max_tokens must be an integer >= 1 or None, got 0"),
    ({"stop": ("ok", "")}, r"stop must be non-empty strings, got \('ok', ''\)"),
    ({"stop": (1,)}, r"stop must be non-empty strings"),
    ({"stop_token_ids": (3, -1)}, r"stop_token_ids must be integers >= 0, got \(3, -1\)"),
    ({"logprobs": -1}, r"logprobs must be an integer >= 0 or None, got -1"),
    ({"length_penalty": math.inf}, r"length_penalty must be a finite number, got inf"),
    ({"early_stopping": "always"}, r"early_stopping must be True, False or 'never', got 'always'"),
    ({"ignore_eos": 1}, r"ignore_eos must be True or False, got 1"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_FIELDS, ids=[str(f) for f, _ in BAD_FIELDS])
def test_out_of_range_field_is_a_value_error_naming_field_and_range(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_edges_of_every_range_are_allowed():
    SamplingParams(n=3, best_of=3, temperature=0.0, top_k=-1, top_p=1.0, min_p=1.0, repetition_penalty=0.5,
                   presence_penalty=-2.0, frequency_penalty=2.0, seed=2**63 - 1, max_tokens=1, stop="x",
                   stop_token_ids=[0], logprobs=0, length_penalty=-1.0, early_stopping="never")  # fmt: skip
    assert SamplingParams(seed=-(2**63), stop=["a", "b"]).stop == ("a", "b")
