from __future__ import annotations

import pytest

from clusterft.data import DatasetError, load_dataset_info
from clusterft.data.registry import get_dataset_attr
from clusterft.errors import UserError


def test_defaults_are_llamafactorys(make_dataset_dir):
    dataset_dir = make_dataset_dir(
        {"a": {"file_name": "a.json"}, "s": {"file_name": "s.json", "formatting": "sharegpt"}}, {}
    )
    info = load_dataset_info(dataset_dir)
    alpaca, sharegpt = info["a"], info["s"]
    assert (alpaca.formatting, alpaca.prompt, alpaca.query, alpaca.response) == (
        "alpaca",
        "instruction",
        "input",
        "output",
    )
    assert alpaca.history is None and alpaca.system is None
    assert sharegpt.formatting == "sharegpt" and sharegpt.messages == "conversations"
    assert (
        sharegpt.role_tag,
        sharegpt.content_tag,
        sharegpt.user_tag,
        sharegpt.assistant_tag,
        sharegpt.system_tag,
    ) == (
        "from",
        "value",
        "human",
        "gpt",
        "system",
    )


def test_columns_and_tags_mapping(make_dataset_dir):
    entry = {
        "file_name": "c.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "msgs", "system": "sys"},
        "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "u", "assistant_tag": "a"},
    }
    attr = load_dataset_info(make_dataset_dir({"c": entry}, {}))["c"]
    assert (
        attr.messages,
        attr.system,
        attr.role_tag,
        attr.content_tag,
        attr.user_tag,
        attr.assistant_tag,
    ) == (
        "msgs",
        "sys",
        "role",
        "text",
        "u",
        "a",
    )


def test_openai_formatting_is_sharegpt_with_role_content_tags(make_dataset_dir):
    attr = load_dataset_info(make_dataset_dir({"o": {"file_name": "o.json", "formatting": "openai"}}, {}))[
        "o"
    ]
    assert attr.formatting == "sharegpt" and attr.messages == "messages"
    assert (attr.role_tag, attr.content_tag, attr.user_tag, attr.assistant_tag) == (
        "role",
        "content",
        "user",
        "assistant",
    )


def test_unknown_dataset_names_file_registered_names_and_closest(make_dataset_dir):
    dataset_dir = make_dataset_dir(
        {"demo_tasks": {"file_name": "a.json"}, "identity": {"file_name": "b.json"}}, {}
    )
    with pytest.raises(DatasetError) as info:
        get_dataset_attr("demo_task", dataset_dir)
    message = str(info.value)
    assert "'demo_task'" in message
    assert str(dataset_dir / "dataset_info.json") in message
    assert "demo_tasks, identity" in message
    assert "did you mean 'demo_tasks'?" in message
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"hf_hub_url": "org/set"}, "missing file_name (hf_hub_url is not supported"),
        ({"file_name": "a.json", "formatting": "csv"}, "formatting 'csv'"),
        ({"file_name": "a.json", "columns": {"images": "img"}}, "'images' is not supported by clusterft"),
        ({"file_name": "a.json", "columns": {"promt": "q"}}, "'promt' is unknown"),
        ({"file_name": "a.json", "tags": {"role_tag": "r"}}, "tags apply to sharegpt datasets only"),
    ],
)
def test_bad_registry_entries_name_the_dataset_and_key(make_dataset_dir, entry, expected):
    with pytest.raises(DatasetError, match="dataset 'x'") as info:
        load_dataset_info(make_dataset_dir({"x": entry}, {}))
    assert expected in str(info.value)


def test_missing_dataset_info(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset_info\.json not found; set dataset_dir"):
        load_dataset_info(tmp_path)
