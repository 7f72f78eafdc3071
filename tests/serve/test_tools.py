"""Tool calling: the model's chat template renders the tools, replies are parsed into `tool_calls`
(whole and streamed), and `required` / named calls are forced by the grammar so they always parse.

The tiny models get chat templates in the two formats (a Qwen2-style hermes one, a Llama 3.1-style
JSON one); their random weights never call a tool on their own, so a call that parses and matches
its schema is the grammar's doing. The official openai client drives the whole tool loop over HTTP.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from clusterft.http import APIError
from clusterft.serve.constraints import chat_tool_format
from clusterft.serve.protocol import ChatCompletionRequest
from clusterft.serve.tools import ToolCallStream, forced_call_grammar, parse_tool_calls, tool_format
from tests.serve.conftest import API_KEY, ENGINE, make_spec, running_app

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call one or more functions.\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'For each call return <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}<|im_start|>assistant"
    "{%- if message.content %}\n{{ message.content }}{%- endif %}"
    "{%- for tc in message.tool_calls or [] %}\n<tool_call>\n"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython"
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nRespond with a JSON function call "
    '{"name": function name, "parameters": dictionary of argument name and its value}.\n'
    "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}<|eot_id|>{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "<|start_header_id|>assistant<|end_header_id|>"
    "\n\n{%- for tc in message.tool_calls %}"
    '{"name": "{{ tc.function.name }}", "parameters": {{ tc.function.arguments | tojson }}}'
    "{%- endfor %}<|eot_id|>"
    "{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ message.content }}"
    "<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _with_template(model_dir: Path, out: Path, template: str) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hermes_model(tiny_llama, tmp_path_factory) -> Path:
    return _with_template(tiny_llama, tmp_path_factory.mktemp("tools") / "hermes", HERMES_TEMPLATE)


@pytest.fixture(scope="module")
def llama3_model(tiny_llama, tmp_path_factory) -> Path:
    return _with_template(tiny_llama, tmp_path_factory.mktemp("tools") / "llama3", LLAMA3_TEMPLATE)


def _assert_calls_valid(calls) -> None:
    assert calls
    for call in calls:
        name, arguments = (
            (call.name, call.arguments)
            if hasattr(call, "name")
            else (call.function.name, call.function.arguments)
        )
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


# ---------------------------------------------------------------- parsing, no model


def test_formats_are_told_by_the_chat_template():
    assert tool_format(HERMES_TEMPLATE) == "hermes"
    assert tool_format(LLAMA3_TEMPLATE) == "llama3_json"
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None


def test_hermes_replies_parse_into_calls_and_content():
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Oslo", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>'
    )
    content, calls = parse_tool_calls("hermes", text)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "celsius"}),
        ("get_time", {"zone": 1}),
    ]
    assert parse_tool_calls("hermes", "<tool_call>\n{not json}\n</tool_call>") == (
        "<tool_call>\n{not json}\n</tool_call>",
        [],
    )
    content, calls = parse_tool_calls(
        "llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"zone": 2}}'
    )
    assert content is None and calls[0].name == "get_time" and json.loads(calls[0].arguments) == {"zone": 2}
    assert parse_tool_calls("llama3_json", "It is sunny.") == ("It is sunny.", [])


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (
            "hermes",
            'Sure <tool!\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 3}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"zone": 4}}\n</tool_call>',
        ),
        ("hermes", "No call here, only <tool and <tool_cal text."),
        ("llama3_json", '{"name": "get_time", "parameters": {"zone": 5}}'),
        ("llama3_json", "Plain words {not a call}."),
    ],
)
def test_streamed_at_any_split_equals_the_whole_parse(fmt, text):
    """Every way of cutting the reply into two deltas streams the same content and calls as the
    whole reply parses to, and no content is sent that later turns out to be a call."""
    whole_content, whole_calls = parse_tool_calls(fmt, text)
    for cut in range(len(text) + 1):
        stream = ToolCallStream(fmt)
        content, calls = "", []
        for piece in (text[:cut], text[cut:]):
            c, d = stream.feed(piece)
            content, calls = content + c, calls + d
        c, d = stream.finish()
        content, calls = content + c, calls + d
        assert [(d["function"]["name"], d["function"]["arguments"]) for d in calls] == [
            (c.name, c.arguments) for c in whole_calls
        ]
        assert [d["index"] for d in calls] == list(range(len(whole_calls)))
        assert content.strip() == (whole_content or "").strip()


def test_tools_on_a_template_without_them_are_a_400(tiny_llama):
    from transformers import AutoTokenizer

    body = ChatCompletionRequest(model="tiny", messages=ASK, tools=TOOLS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)  # chatml: renders no tools
    with pytest.raises(APIError) as err:
        chat_tool_format(body, "tokenizer", tokenizer)
    assert err.value.status == 400 and err.value.param == "tools"


def test_forced_calls_parse_offline_in_both_formats(hermes_model, llama3_model):
    """required (any tool, parallel allowed) and named, rendered by each model's template and
    generated by the engine under the call grammar: every reply is calls that match their schemas."""
    from clusterft.engine import LLM, SamplingParams

    for model, fmt in [(hermes_model, "hermes"), (llama3_model, "llama3_json")]:
        llm = LLM(model, num_gpu_blocks=128)
        prompt = llm.engine.tokenizer.apply_chat_template(
            ASK, tools=TOOLS, tokenize=False, add_generation_prompt=True
        )
        functions = [t["function"] for t in TOOLS]
        cases = [(functions, True), (functions[1:], False)]
        params = [
            SamplingParams(
                temperature=1.0,
                seed=s,
                max_tokens=200,
                structured_outputs=forced_call_grammar(fmt, fs, parallel),
            )
            for s, (fs, parallel) in enumerate(cases)
        ]
        outs = llm.generate([prompt] * len(cases), params)
        for (fs, _), out in zip(cases, outs, strict=True):
            assert out.outputs[0].finish_reason == "stop"
            _, calls = parse_tool_calls(fmt, out.outputs[0].text)
            _assert_calls_valid(calls)
            assert {c.name for c in calls} <= {f["name"] for f in fs}


# ---------------------------------------------------------------- over HTTP, the official client


@pytest.fixture(scope="module")
def url(hermes_model):
    engine = ENGINE.model_copy(update={"max_model_len": 1024})  # the tools' JSON is in the prompt
    with running_app(make_spec(hermes_model, api_key=API_KEY, engine=engine)) as base:
        yield base


@pytest.mark.slow
def test_openai_client_tool_loop(url):
    """required -> tool_calls; the call and its result go back; none -> a plain answer."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    messages = list(ASK)
    first = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=200, seed=1
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    _assert_calls_valid(choice.message.tool_calls)
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in choice.message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'})
    second = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert second.choices[0].message.tool_calls is None
    assert isinstance(second.choices[0].message.content, str)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were rendered


@pytest.mark.slow
def test_named_tool_choice_streams_tool_call_deltas(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    stream = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        max_tokens=200,
        stream=True,
        seed=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)
    assert calls[0]["id"].startswith("call_")


@pytest.mark.slow
def test_bad_tool_requests_are_400s_naming_the_field(url):
    def post(**body):
        return httpx.post(
            f"{url}/v1/chat/completions",
            headers=AUTH,
            timeout=30,
            json={"model": "tiny", "messages": ASK, **body},
        )

    unknown = post(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert unknown.status_code == 400 and "no tool named 'nope'" in unknown.json()["error"]["message"]
    assert post(tool_choice="required").status_code == 400  # no tools
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}]
    r = post(tools=bad_params, tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    both = post(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert both.status_code == 400 and "give only one" in both.json()["error"]["message"]
