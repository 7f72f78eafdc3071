from __future__ import annotations

import json

import pytest

from clusterft.data import DatasetError, Example, load_examples

ALPACA_INFO = {"al": {"file_name": "al.json", "columns": {"system": "system", "history": "history"}}}


def _messages(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def test_alpaca_json_list(make_dataset_dir):
    records = [
        {"instruction": "reverse", "input": "123", "output": "321"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief."},
        {"instruction": "and now?", "output": "2", "history": [["1+0?", "1"]]},
    ]
    dataset_dir = make_dataset_dir(ALPACA_INFO, {"al.json": json.dumps(records, indent=2)})
    examples = load_examples(["al"], dataset_dir)
    assert [e.messages for e in examples] == [
        _messages(("user", "reverse\n123"), ("assistant", "321")),
        _messages(("system", "Be brief."), ("user", "Say hi."), ("assistant", "hi")),
        _messages(("user", "1+0?"), ("assistant", "1"), ("user", "and now?"), ("assistant", "2")),
    ]
    # indent=2: the records open on lines 2, 7 and 13.
    assert [e.line for e in examples] == [2, 7, 13]
    assert examples[0].source_file == str(dataset_dir / "al.json")
    assert examples[0].prompt_messages == _messages(("user", "reverse\n123"))
    assert examples[0].reference == "321"


def test_alpaca_jsonl_with_column_mapping(make_dataset_dir):
    info = {"m": {"file_name": "m.jsonl", "columns": {"prompt": "q", "query": "ctx", "response": "a"}}}
    lines = ['{"q": "double", "ctx": "4", "a": "8"}', "", '{"q": "halve", "a": "2"}']
    examples = load_examples(["m"], make_dataset_dir(info, {"m.jsonl": "\n".join(lines)}))
    assert [e.messages for e in examples] == [
        _messages(("user", "double\n4"), ("assistant", "8")),
        _messages(("user", "halve"), ("assistant", "2")),
    ]
    assert [e.line for e in examples] == [1, 3]


def test_sharegpt_default_tags_json_and_jsonl(make_dataset_dir):
    conversation = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "observation", "value": "o"},
            {"from": "gpt", "value": "a2"},
        ]
    }
    info = {
        "j": {"file_name": "j.json", "formatting": "sharegpt"},
        "l": {"file_name": "l.jsonl", "formatting": "sharegpt"},
    }
    files = {"j.json": json.dumps([conversation]), "l.jsonl": json.dumps(conversation) + "\n"}
    examples = load_examples(["j", "l"], make_dataset_dir(info, files))
    expected = _messages(
        ("system", "S"), ("user", "q1"), ("assistant", "a1"), ("tool", "o"), ("assistant", "a2")
    )
    assert [e.messages for e in examples] == [expected, expected]
    assert [e.source_file.rsplit("/", 1)[1] for e in examples] == ["j.json", "l.jsonl"]


def test_sharegpt_custom_tags_system_column_and_openai(make_dataset_dir):
    info = {
        "t": {
            "file_name": "t.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "msgs", "system": "sys"},
            "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"},
        },
        "o": {"file_name": "o.jsonl", "formatting": "openai"},
    }
    files = {
        "t.jsonl": json.dumps(
            {"sys": "S", "msgs": [{"who": "me", "text": "q"}, {"who": "bot", "text": "a"}]}
        ),
        "o.jsonl": json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        ),
    }
    custom, openai = load_examples(["t", "o"], make_dataset_dir(info, files))
    assert custom.messages == _messages(("system", "S"), ("user", "q"), ("assistant", "a"))
    assert openai.messages == _messages(("user", "q"), ("assistant", "a"))


def test_max_samples_takes_the_first_records_of_each_dataset(make_dataset_dir):
    records = [{"instruction": str(i), "output": str(i)} for i in range(10)]
    dataset_dir = make_dataset_dir(ALPACA_INFO, {"al.json": json.dumps(records)})
    examples = load_examples(["al"], dataset_dir, max_samples=3)
    assert [e.reference for e in examples] == ["0", "1", "2"]


def test_bad_alpaca_records_are_reported_together_with_lines(make_dataset_dir):
    lines = [
        "[",
        '{"instruction": "ok", "output": "fine"},',
        '{"instruction": "no output"},',
        '{"instruction": "typed", "output": 3},',
        '"just a string",',
        "{",
        '  "instruction": "", "input": "",',
        '  "output": "x"',
        "},",
        '{"instruction": "h", "output": "y", "history": [["only one"]]}',
        "]",
    ]
    dataset_dir = make_dataset_dir(ALPACA_INFO, {"al.json": "\n".join(lines)})
    with pytest.raises(DatasetError) as info:
        load_examples(["al"], dataset_dir)
    message = str(info.value)
    path = dataset_dir / "al.json"
    assert message.startswith("5 bad records")
    assert f"{path}:3: missing 'output'" in message
    assert f"{path}:4: 'output' must be a string, got int" in message
    assert f"{path}:5: expected an object" in message
    assert f"{path}:6: empty prompt" in message
    assert f"{path}:10: 'history' must be a list of [query, response] string pairs" in message
    assert f"{path}:2:" not in message


def test_bad_sharegpt_and_jsonl_lines_are_reported_together(make_dataset_dir):
    def conv(*roles: str) -> str:
        return json.dumps({"conversations": [{"from": r, "value": "v"} for r in roles]})

    lines = [
        conv("human", "gpt"),
        conv("human", "human"),
        conv(),
        "{not json",
        conv("human", "gpt", "human"),
        json.dumps({"conversations": [{"role": "user", "content": "q"}]}),
        conv("gpt", "human"),
        conv("human", "robot"),
    ]
    info = {"s": {"file_name": "s.jsonl", "formatting": "sharegpt"}}
    dataset_dir = make_dataset_dir(info, {"s.jsonl": "\n".join(lines)})
    with pytest.raises(DatasetError) as exc:
        load_examples(["s"], dataset_dir)
    message = str(exc.value)
    path = dataset_dir / "s.jsonl"
    assert message.startswith("7 bad records")
    assert f"{path}:2: message 1: roles must alternate" in message
    assert f"{path}:3: empty 'conversations'" in message
    assert f"{path}:4: invalid JSON" in message
    assert f"{path}:5: the conversation must end with an assistant turn" in message
    assert f"{path}:6: message 0: expected an object with 'from' and 'value' (OpenAI-style" in message
    assert f"{path}:7: message 0: roles must alternate" in message
    assert f"{path}:8: message 1: unknown role 'robot'" in message


def test_broken_json_list_names_the_line(make_dataset_dir):
    text = '[\n{"instruction": "a", "output": "b"},\n{"instruction": "a" "output": "b"}\n]'
    with pytest.raises(DatasetError, match=r"al\.json:3: invalid JSON"):
        load_examples(["al"], make_dataset_dir(ALPACA_INFO, {"al.json": text}))


def test_missing_file_is_a_dataset_error(make_dataset_dir):
    with pytest.raises(DatasetError, match="dataset file not found"):
        load_examples(["al"], make_dataset_dir(ALPACA_INFO, {}))


def test_example_is_a_plain_value():
    example = Example(messages=_messages(("user", "q"), ("assistant", "a")), source_file="f.json", line=7)
    assert example.location == "f.json:7"
