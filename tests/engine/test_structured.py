"""Structured outputs in the engine: a random-weight model's output always matches its grammar.

The tiny model's weights are random, so whatever it produces is the grammar's doing: every output of
a hypothesis-generated JSON schema must parse and validate, sampled or greedy, in a batch beside
unconstrained requests (whose tokens the bitmask must not change), across preemption and prefix-cache
hits.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterft.engine import LLM, SamplingParams
from clusterft.engine.structured import StructuredOutputsParams

PROMPT = "the answer, as JSON:"
NAMES = st.sampled_from(["a", "b", "name", "value", "x_1", "ключ"])


def _leaf() -> st.SearchStrategy[dict]:
    return st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.builds(
            lambda lo, d: {"type": "integer", "minimum": lo, "maximum": lo + d},
            st.integers(-50, 50),
            st.integers(0, 100),
        ),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(
            lambda v: {"enum": v},
            st.lists(st.sampled_from(["red", "grün", 3, None]), min_size=1, max_size=3, unique=True),
        ),
    )


def _schema() -> st.SearchStrategy[dict]:
    def extend(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
        objects = st.dictionaries(NAMES, children, max_size=3).map(
            lambda props: {
                "type": "object",
                "properties": props,
                "required": sorted(props),
                "additionalProperties": False,
            }
        )
        arrays = st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n},
                           children, st.integers(0, 3))  # fmt: skip
        return st.one_of(objects, arrays)

    return st.recursive(_leaf(), extend, max_leaves=5)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, num_gpu_blocks=256, max_num_seqs=16)


def _json_params(schema: dict, seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=0.0 if seed is None else 1.0,
        seed=seed,
        max_tokens=400,
        structured_outputs=StructuredOutputsParams(json=schema),
        **kw,
    )


def _assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(_schema(), min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_hypothesis_schemas_always_validate(llm, schemas, seed):
    plain = SamplingParams(temperature=1.0, seed=7, max_tokens=8)
    params = [_json_params(s, seed + i if i % 2 else None) for i, s in enumerate(schemas)]
    outs = llm.generate([PROMPT] * len(schemas) + [PROMPT], [*params, plain])
    for schema, out in zip(schemas, outs, strict=False):
        assert out.outputs[0].finish_reason == "stop", (schema, out.outputs[0].text)
        _assert_valid(out.outputs[0].text, schema)
    # The unconstrained row beside them samples what it samples alone.
    alone = llm.generate(PROMPT, plain)[0].outputs[0].token_ids
    assert outs[-1].outputs[0].token_ids == alone


def test_without_the_grammar_the_model_writes_no_json(llm):
    """The check above is not vacuous: unconstrained, this model's output is not JSON."""
    text = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30))[0].outputs[0].text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_regex_choice_grammar_and_json_object(llm):
    kinds = [
        (StructuredOutputsParams(regex=r"[a-z]{3}-\d{2}"), lambda t: re.fullmatch(r"[a-z]{3}-\d{2}", t)),
        (StructuredOutputsParams(choice=["yes", "no", "maybe"]), lambda t: t in {"yes", "no", "maybe"}),
        (
            StructuredOutputsParams(grammar='start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,2}/'),
            lambda t: re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", t),
        ),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    params = [
        SamplingParams(temperature=1.0, seed=3, max_tokens=200, structured_outputs=so) for so, _ in kinds
    ]
    outs = llm.generate([PROMPT] * len(kinds), params)
    for (_, ok), out in zip(kinds, outs, strict=True):
        assert out.outputs[0].finish_reason == "stop"
        assert ok(out.outputs[0].text), out.outputs[0].text


SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tags": {
        "type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}},
    "required": ["id", "tags"],
    "additionalProperties": False,
}  # fmt: skip


def test_parallel_sampling_forks_the_matcher(llm):
    out = llm.generate(PROMPT, _json_params(SCHEMA, 11, n=3))[0]
    assert len(out.outputs) == 3
    for o in out.outputs:
        _assert_valid(o.text, SCHEMA)
    assert len({o.text for o in out.outputs}) > 1  # independent samples, each with its own matcher


def test_prefix_cache_hit_gives_the_same_tokens(llm):
    prompt = f"{PROMPT} cached" * 4
    params = _json_params(SCHEMA, None)
    first = llm.generate(prompt, params)[0]
    again = llm.generate(prompt, params)[0]  # its prompt's blocks are in the prefix cache now
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    _assert_valid(again.outputs[0].text, SCHEMA)


def test_preempted_requests_still_match_their_schema(llama_dir):
    """A cache too small for all six at once: requests are preempted and recomputed mid-output, and
    their matchers carry on from the tokens they had (a recompute never re-feeds them)."""
    small = LLM(llama_dir, num_gpu_blocks=12, max_num_seqs=6, preemption_mode="recompute")
    prompts = [f"{PROMPT} {i}" * 3 for i in range(6)]
    outs = small.generate(prompts, [_json_params(SCHEMA, 100 + i) for i in range(6)])
    assert small.engine.get_stats().num_preemptions_recompute > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        _assert_valid(o.outputs[0].text, SCHEMA)


@pytest.mark.parametrize(
    ("so", "message"),
    [
        (StructuredOutputsParams(json={"type": "frobnicate"}), "structured_outputs.json: "),
        (StructuredOutputsParams(regex="a(b"), "structured_outputs.regex: "),
        (StructuredOutputsParams(grammar="start: nothing_defined"), "structured_outputs.grammar: "),
    ],
)
def test_bad_grammars_are_refused_when_added(llm, so, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.engine.add_request("bad", PROMPT, SamplingParams(structured_outputs=so))
    assert not llm.engine.has_unfinished_requests()


def test_params_name_what_is_wrong():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match=r"exactly one of .*got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not supported with use_beam_search"):
        SamplingParams(temperature=0, use_beam_search=True, n=2,
                       structured_outputs=StructuredOutputsParams(regex="a"))  # fmt: skip
