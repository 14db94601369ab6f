"""The ``qwen3_coder`` tool-call format (Qwen3-Coder, Qwen 3.5): XML calls whose bare values are read by the
function's parameter schema, whole and while they are being written."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_engine import xml_calls
from proxy_engine.tool_calls import ParsedCall, detect_format, parse_calls, render_calls

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string"}, "n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string"}}, "opt": {"type": ["string", "null"]},
    "code": {"type": "string"}, "where": {"type": "object"}}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}}}}]
PARIS = ParsedCall("get_weather", '{"city": "Paris"}')
# As Qwen3-Coder writes a call: each tag on its own line, a value between newlines.
WRITTEN = ("I'll look.\n<tool_call>\n<function=f>\n<parameter=n>\n3\n</parameter>\n<parameter=x>\n2.50\n</parameter>\n"
           "<parameter=ok>\nTrue\n</parameter>\n<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n<parameter=opt>\nnull\n"
           "</parameter>\n<parameter=code>\nif a < b:\n    return \"x\"\n\n</parameter>\n<parameter=where>\n"
           "{'lat': 1.5}\n</parameter>\n<parameter=free>\n7\n</parameter>\n</function>\n</tool_call>")
READ = {"n": 3, "x": 2.5, "ok": True, "tags": ["a", "b"], "opt": None, "code": "if a < b:\n    return \"x\"\n",
        "where": {"lat": 1.5}, "free": "7"}


@pytest.mark.parametrize("text, content, calls", [
    (WRITTEN, "I'll look.\n", [ParsedCall("f", json.dumps(READ))]),
    ("<function=get_weather><parameter=city>Paris</parameter></function>", None, [PARIS]),  # bare, no newlines
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>", None, [PARIS]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
     "<tool_call>\n<function=f>\n<parameter=n>\nthree\n</parameter>\n</function>\n</tool_call>", None,
     [PARIS, ParsedCall("f", '{"n": "three"}')]),  # not an integer: kept as the string written
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", None, []),  # cut by max_tokens: text
    ("Just text.", "Just text.", []),
])
def test_parse(text, content, calls):
    expected_content = text if not calls else content
    assert parse_calls("qwen3_coder", text, TOOLS) == (expected_content, calls)


def test_without_the_schema_every_value_is_a_string():
    assert parse_calls("qwen3_coder", "<function=f><parameter=n>\n3\n</parameter></function>")[1] == [
        ParsedCall("f", '{"n": "3"}')]


def test_rendered_calls_read_back_as_they_were():
    arguments = {"city": "Paris", "n": 3, "x": 0.5, "ok": False, "tags": ["q\"uote\n"], "code": "\nindented\n",
                 "where": {"a": [1, None]}}
    text = render_calls("qwen3_coder", [{"function": {"name": "f", "arguments": json.dumps(arguments)}}])
    assert text.startswith("<tool_call>\n<function=f>\n<parameter=city>\nParis\n</parameter>\n")
    assert parse_calls("qwen3_coder", text, TOOLS)[1] == [ParsedCall("f", json.dumps(arguments))]


def test_detected_from_a_qwen3_coder_template():
    template = ("For each function call, return within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n")
    assert detect_format(template) == "qwen3_coder"
    assert detect_format("<tool_call>{{ tool_call | tojson }}</tool_call>") == "hermes"


def test_arguments_so_far_only_grow():
    body = WRITTEN[WRITTEN.index("<function=f>") + len("<function=f>"):]
    schemas = xml_calls.properties(TOOLS, "f")

    def read_once(text: str) -> str:  # a fresh reader given the whole body so far
        return xml_calls.XmlArguments(schemas).feed(text)

    seen = [read_once(body[:cut]) for cut in range(len(body) + 1)]
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))
    assert seen[-1] == json.dumps(READ)
    reader = xml_calls.XmlArguments(schemas)  # read as it grows, only what is new each time: the same text
    for step in (1, 3, 7):
        reader = xml_calls.XmlArguments(schemas)
        assert [reader.feed(body[:cut]) for cut in range(0, len(body) + 1, step)] == seen[::step]
    # a string value shows as it is written; other types, null and a possible closing tag wait
    assert read_once("\n<parameter=code>\nif a <") == '{"code": "if a '
    assert read_once("\n<parameter=opt>\nnul") == "{"
    assert read_once("\n<parameter=n>\n12") == "{"


_VALUES = st.one_of(
    st.text(st.characters(blacklist_characters="<\r"), max_size=20).filter(lambda s: s.strip().lower() != "null"),
    st.integers(-10**6, 10**6), st.booleans(), st.lists(st.integers(), max_size=3))
_TYPES = {str: "string", int: "integer", bool: "boolean", list: "array"}


@settings(max_examples=100, deadline=None)
@given(arguments=st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), _VALUES, max_size=4))
def test_any_rendered_call_streams_to_its_arguments(arguments):
    from server.tools import ChoiceStream, ToolPlan

    schema = {"type": "object", "properties": {k: {"type": _TYPES[type(v)]} for k, v in arguments.items()}}
    plan = ToolPlan("auto", [{"type": "function", "function": {"name": "g", "parameters": schema}}], fmt="qwen3_coder")
    text = render_calls("qwen3_coder", [{"function": {"name": "g", "arguments": arguments}}])
    stream = ChoiceStream(plan)
    deltas = [d for char in text for d in stream.feed(char)] + stream.finish()
    joined = "".join(c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", []))
    assert joined == json.dumps(arguments, ensure_ascii=False) == plan.calls(text)[1][0].arguments


# Qwen3-Coder's chat template, cut to what matters here: the format's instructions, an assistant turn's calls
# written back with their arguments as items, tool results as user turns.
QWEN3_CODER_LIKE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n"
    "Reply in this format:\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\n"
    "value_1\n</parameter>\n</function>\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for tc in m.tool_calls %}\n<tool_call>\n<function={{ tc.function.name }}>\n"
    "{%- for k, v in tc.function.arguments | items %}<parameter={{ k }}>\n"
    "{{ v if v is string else v | tojson }}\n</parameter>\n{%- endfor %}</function>\n</tool_call>{%- endfor %}"
    "<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_qwen3_coder_template_writes_earlier_calls_the_way_they_are_read(tiny_family):
    from transformers import AutoTokenizer

    from proxy_engine.config import DEFAULT_TRANSCRIPT_TEMPLATE
    from proxy_engine.prompts import PromptRenderer
    from proxy_engine.request import PromptInput

    assert detect_format(QWEN3_CODER_LIKE) == "qwen3_coder"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family.base))
    renderer = PromptRenderer(tokenizer, "chat", DEFAULT_TRANSCRIPT_TEMPLATE, QWEN3_CODER_LIKE)
    arguments = {"city": "Paris", "n": 2, "tags": ["x"]}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": json.dumps(arguments)}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "21C", "tool_call_id": "call_1"}]
    text = renderer.render_text(PromptInput(messages=messages, tools=TOOLS))
    turn = text[text.index("<|im_start|>assistant\n<tool_call>"):text.index("<|im_start|>user\n<tool_response>")]
    assert parse_calls("qwen3_coder", turn, TOOLS)[1] == [ParsedCall("f", json.dumps(arguments))]
