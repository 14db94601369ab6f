"""Tool-call formats: parsing each family's calls, writing them into transcripts, and the prompts models see."""

from __future__ import annotations

import json

import pytest

from proxy_engine.config import DEFAULT_TRANSCRIPT_TEMPLATE
from proxy_engine.prompts import PromptRenderer
from proxy_engine.request import PromptInput
from proxy_engine.tool_calls import (
    FORMATS,
    ParsedCall,
    detect_format,
    looks_like_call_start,
    marker_prefix_len,
    mistral_call_id,
    parse_calls,
    render_calls,
    tools_preamble,
)

CALL = ParsedCall("get_weather", json.dumps({"city": "Paris"}))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
OPENAI_CALL = {"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ASKED = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [OPENAI_CALL]}]


@pytest.mark.parametrize(
    "fmt, text, content, calls",
    [
        ("hermes", 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         "Sure.", [CALL]),
        ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
                   '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
         None, [CALL, CALL]),
        ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [CALL]),  # no close
        ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        ("hermes", "just text", "just text", []),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [CALL]),
        ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                        '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [CALL, CALL]),
        ("llama3_json", '{"not": "a call"}', '{"not": "a call"}', []),
        ("mistral", 'Ok [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "Ok ", [CALL]),
        ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [CALL]),
        ("mistral", "[TOOL_CALLS]oops", "[TOOL_CALLS]oops", []),
        ("pythonic", '[get_weather(city="Paris")]', None, [CALL]),
        ("pythonic", "<|python_start|>[get_weather(city='Paris'), get_weather(city=\"Paris\")]<|python_end|>", None,
         [CALL, CALL]),
        ("pythonic", '[f(a=[1, 2.5, "x, y)]"], b={"k": None, "t": True}, c=-3)]', None,
         [ParsedCall("f", json.dumps({"a": [1, 2.5, "x, y)]"], "b": {"k": None, "t": True}, "c": -3}))]),
        ("pythonic", "[now()]", None, [ParsedCall("now", "{}")]),
        ("pythonic", "[1, 2, 3]", "[1, 2, 3]", []),  # a list, not calls: content
        ("pythonic", "[f(x=open('/etc/passwd'))]", "[f(x=open('/etc/passwd'))]", []),  # never evaluated
        ("pythonic", "[f('positional')]", "[f('positional')]", []),
        ("pythonic", "[os.system(cmd='ls')]", "[os.system(cmd='ls')]", []),
        ("pythonic", "[f(**{'a': 1})]", "[f(**{'a': 1})]", []),
        ("pythonic", "[f(a={1, 2})]", "[f(a={1, 2})]", []),  # a set has no JSON
        ("pythonic", "Sure: [get_weather(city='Paris')]", "Sure: [get_weather(city='Paris')]", []),
        ("pythonic", "[get_weather(city='Par", "[get_weather(city='Par", []),  # cut by max_tokens
        ("granite", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [CALL]),
        ("granite", ' <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                    '{"arguments": {"city": "Paris"}, "name": "get_weather"}]', None, [CALL, CALL]),  # 3.1's tag
        ("granite", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [CALL]),  # the token skipped
        ("granite", "[1, 2]", "[1, 2]", []),
        ("granite", 'Sure: [{"name": "f", "arguments": {}}]', 'Sure: [{"name": "f", "arguments": {}}]',
         []),  # the calls are the whole answer
        ("granite", '<|tool_call|>[{"name": "get_weather", "arguments": {"ci', '<|tool_call|>[{"name": "get_weather", '
                    '"arguments": {"ci', []),
        # OLMo 3: one call a line inside <function_calls>, each value written as JSON (its template's tojson)
        ("olmo3", 'Sure.<function_calls>get_weather(city="Paris")</function_calls>', "Sure.", [CALL]),
        ("olmo3", '<function_calls>\nf(a=true, b=null, c={"k": false, "n": [1, 2.5]}, d="x\\ny")\n'
                  'get_weather(city="Paris")\n</function_calls>', None,
         [ParsedCall("f", json.dumps({"a": True, "b": None, "c": {"k": False, "n": [1, 2.5]}, "d": "x\ny"})), CALL]),
        ("olmo3", '<function_calls>get_weather(city="Paris")', None, [CALL]),  # ended at its end token
        ("olmo3", '<function_calls>[get_weather(city="Paris")]</function_calls>', None, [CALL]),  # a list too
        ("olmo3", "<function_calls>import os</function_calls>", "<function_calls>import os</function_calls>", []),
        ("olmo3", "<function_calls>f(x=open('/etc/passwd'))</function_calls>",
         "<function_calls>f(x=open('/etc/passwd'))</function_calls>", []),  # never evaluated
        ("olmo3", "<function_calls>f(true)</function_calls>", "<function_calls>f(true)</function_calls>", []),
        ("olmo3", 'get_weather(city="Paris")', 'get_weather(city="Paris")', []),  # no tags: text
        ("olmo3", '<function_calls>get_weather(city="Par', '<function_calls>get_weather(city="Par', []),  # cut
        ("pythonic", "[f(a=true)]", "[f(a=true)]", []),  # JSON's literals are OLMo's, not Python's
    ],
)
def test_parse_calls(fmt, text, content, calls):
    assert parse_calls(fmt, text) == (content, calls)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rendered_calls_parse_back(fmt):
    text = render_calls(fmt, [OPENAI_CALL])
    assert parse_calls(fmt, text)[1] == [CALL]
    nested = {"id": "c", "type": "function", "function": {"name": "f", "arguments": json.dumps(
        {"a": [1, None, True, "q\"uote\n"], "b": {"x": 0.5}})}}
    # qwen3_coder writes values bare: reading them back needs their types
    typed = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array"}, "b": {"type": "object"}}}}}]
    assert parse_calls(fmt, render_calls(fmt, [nested, OPENAI_CALL]), typed)[1] == [
        ParsedCall("f", nested["function"]["arguments"]), CALL]


def test_detect_format_from_the_chat_template():
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("{% if m.role == 'ipython' %}<|python_tag|>{% endif %}") == "llama3_json"
    assert detect_format("<tool_call>") == "hermes"
    assert detect_format("{{ '<|tool_call|>' }}[{\"name\": ...}]") == "granite"  # Granite 3.x
    assert detect_format(None) == "hermes"
    # Llama 3.2's pythonic template (vLLM's example) still names the ipython role for tool results
    pythonic = ("you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2"
                "...), func_name2(params)]{% if message.role == 'ipython' %}")
    assert detect_format(pythonic) == "pythonic"
    # OLMo 3 Instruct's template: the tools in <functions>, the calls in <function_calls>, results as "environment"
    olmo = ("{% if tools %}<functions>{{ tools | tojson }}</functions>{% endif %}{% for m in messages %}"
            "{% if m.tool_calls %}<function_calls>...</function_calls>{% endif %}{% endfor %}")
    assert detect_format(olmo) == "olmo3"


# An OLMo-3-like chat template: the tools as JSON in the system turn, an assistant's calls one a line as
# name(key=value as JSON), a tool result in an "environment" turn.
OLMO_LIKE = (
    "{%- for m in messages %}<|im_start|>{{ 'environment' if m.role == 'tool' else m.role }}\n"
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{%- if m.tool_calls %}<function_calls>{% for c in m.tool_calls %}{% set parts = namespace(items=[]) %}"
    "{%- for k, v in c.function.arguments.items() %}{% set parts.items = parts.items + [k ~ '=' ~ (v | tojson)] %}"
    "{%- endfor %}{{ c.function.name }}({{ parts.items | join(', ') }}){% if not loop.last %}\n{% endif %}"
    "{%- endfor %}</function_calls>{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if tools %}<functions>{{ tools | tojson }}</functions>{% endif %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_olmo3_earlier_calls_reach_the_template_as_it_writes_them(tiny_family):
    """The template is given the arguments as an object (it iterates their items) and writes the call the way the
    model answers, so parsing the rendered turn gives the call back; a tool result follows as its own turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family.base))
    renderer = PromptRenderer(tokenizer, "chat", DEFAULT_TRANSCRIPT_TEMPLATE, OLMO_LIKE)
    assert detect_format(OLMO_LIKE) == "olmo3"
    messages = [*ASKED, {"role": "tool", "content": "21C", "tool_call_id": "call_1"}]
    text = renderer.render_text(PromptInput(messages=messages, tools=TOOLS))
    turn = '<function_calls>get_weather(city="Paris")</function_calls>'
    assert turn in text and render_calls("olmo3", [OPENAI_CALL]) == turn
    assert parse_calls("olmo3", turn)[1] == [CALL]
    assert "<|im_start|>environment\n21C" in text and '"get_weather"' in text


def test_a_pythonic_answer_is_held_back_while_it_may_be_a_call():
    assert looks_like_call_start("pythonic", " [get_weather(")
    assert looks_like_call_start("pythonic", "<|python_start|>[")
    assert not looks_like_call_start("pythonic", "The answer [1] is")


def test_marker_prefix_len():
    assert marker_prefix_len("hermes", "Hello <tool") == len("<tool")
    assert marker_prefix_len("hermes", "Hello") == 0
    assert marker_prefix_len("mistral", "x [TOOL_") == len("[TOOL_")


def test_the_transcript_shows_tools_calls_and_results(tiny_family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family.base))
    renderer = PromptRenderer(tokenizer, "plain", DEFAULT_TRANSCRIPT_TEMPLATE, None)
    messages = [*ASKED, {"role": "tool", "content": "21C", "tool_call_id": "call_1"}]
    text = renderer.render_text(PromptInput(messages=messages, tools=TOOLS))
    assert text.startswith(tools_preamble("hermes", TOOLS))
    assert 'Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n' in text
    assert text.endswith("Tool: 21C\nAssistant:")
    # Without tools the transcript is what it always was.
    plain = renderer.render_text(PromptInput(messages=[{"role": "user", "content": "Hi"}]))
    assert plain == "User: Hi\nAssistant:"


def test_a_chat_model_gets_tools_through_its_template(tiny_family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family.base))
    template = ("{% if tools %}TOOLS={{ tools | tojson }};{% endif %}{% for m in messages %}{{ m.role }}:"
                "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}"
                "{% else %}{{ m.content }}{% endif %};"
                "{% endfor %}")
    renderer = PromptRenderer(tokenizer, "chat", DEFAULT_TRANSCRIPT_TEMPLATE, template)
    messages = ASKED
    text = renderer.render_text(PromptInput(messages=messages, tools=TOOLS))
    assert text.startswith("TOOLS=") and '"get_weather"' in text
    assert "assistant:Paris;" in text  # arguments reach the template as an object, as transformers documents


def test_a_family_whose_templates_render_no_tools_has_no_tool_call_format():
    """SmolLM2's, Llama 2's and the demo's templates ignore ``tools``: such a family was never tuned to call them
    (the server then answers tool_choice auto without them); the first template that renders tools decides."""
    from types import SimpleNamespace

    from proxy_engine.config import EngineConfig
    from proxy_engine.intake import resolve_tool_call_format
    from proxy_engine.tool_calls import renders_tools

    def model(template, fmt="chat"):
        return SimpleNamespace(renderer=SimpleNamespace(chat_template=template, prompt_format=fmt))

    plain = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    hermes = "{% if tools %}{{ tools | tojson }}{% endif %}" + plain
    mistral = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]" + plain
    assert not renders_tools(plain) and not renders_tools(None) and renders_tools(hermes)
    assert not renders_tools("{{ mytools }}")  # a word containing "tools" is not the variable
    config = EngineConfig(base={"path": "b"})
    assert resolve_tool_call_format(config, [model(None, "plain"), model(plain), model(None, "plain")]) is None
    assert resolve_tool_call_format(config, [model(None, "plain"), model(plain), model(hermes, "plain")]) == "hermes"
    assert resolve_tool_call_format(config, [model(mistral, "plain"), model(hermes)]) == "hermes"  # chat first
    assert resolve_tool_call_format(config, [model(mistral, "plain"), model(plain)]) == "mistral"
    forced = EngineConfig(base={"path": "b"}, tool_call_format="llama3_json")
    assert resolve_tool_call_format(forced, [model(plain)]) == "llama3_json"  # the operator's word wins


# Mistral v0.3's chat template, cut to its tool-call id checks: it raises on an id that is not 9 characters.
MISTRAL_LIKE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.tool_calls %}[TOOL_CALLS][{%- for c in m.tool_calls %}"
    "{%- if c.id is not defined or c.id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}, \"id\": \"{{ c.id }}\"}"
    "{%- endfor %}]</s>"
    "{%- elif m.role == 'tool' %}"
    "{%- if m.tool_call_id is not defined or m.tool_call_id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "[TOOL_RESULTS]{\"content\": {{ m.content | tojson }}, \"call_id\": \"{{ m.tool_call_id }}\"}[/TOOL_RESULTS]"
    "{%- endif %}{%- endfor %}"
)


@pytest.mark.parametrize("call_id", ["call_8f14e45fceea167a5a36dedd", "toolu_01A09q90qw90lq917835lq9",
                                     "abc123XYZ", "c1", "chatcmpl-tool-1"])
def test_mistral_templates_get_the_nine_character_ids_they_require(tiny_family, call_id):
    """An OpenAI-style id (ours, or another server's) sent back in the next turn is what Mistral's templates
    refuse: for the mistral format the call and its result both carry the same 9-letter-and-digit id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family.base))
    call = {**OPENAI_CALL, "id": call_id}
    messages = [ASKED[0], {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "21C", "tool_call_id": call_id}]
    renderer = PromptRenderer(tokenizer, "chat", DEFAULT_TRANSCRIPT_TEMPLATE, MISTRAL_LIKE)
    renderer.tool_format = "mistral"
    text = renderer.render_text(PromptInput(messages=messages))
    short = mistral_call_id(call_id)
    assert len(short) == 9 and short.isalnum()
    assert f'"id": "{short}"' in text and f'"call_id": "{short}"' in text
    if call_id == "abc123XYZ":
        assert short == call_id  # an id Mistral's templates accept is kept
    renderer.tool_format = "hermes"  # other families' templates get the ids as sent
    if len(call_id) != 9:
        with pytest.raises(ValueError, match="chat template refused"):
            renderer.render_text(PromptInput(messages=messages))
