"""Gemma 4's tool-call format: bare keys, strings between <|"|> marks, read whole and translated to JSON as the
call is written (``Gemma4Arguments``), so that streamed arguments join to the whole answer's."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_engine.gemma4_calls import Gemma4Arguments
from proxy_engine.tool_calls import ParsedCall, detect_format, parse_calls, render_calls
from server.tools import ChoiceStream, ToolPlan

Q = '<|"|>'
WEATHER = ParsedCall("get_weather", '{"city": "Paris"}')


@pytest.mark.parametrize("text, content, calls", [
    (f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>", None, [WEATHER]),
    (f"Let me look.<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
     f"<|tool_call>call:now{{}}<tool_call|>", "Let me look.", [WEATHER, ParsedCall("now", "{}")]),
    (f"<|tool_call>call:f{{ n : 3, x:1.50, ok:true, no:false, a:none, b:NULL, word:celsius, "
     f"tags:[{Q}a, b{Q},2,[]], deep:{{{Q}k{Q}:{{}}}}, s:{Q}q\"uote {{not: structure}}\n{Q}}}<tool_call|>", None,
     [ParsedCall("f", json.dumps({"n": 3, "x": 1.5, "ok": True, "no": False, "a": None, "b": None, "word": "celsius",
                                  "tags": ["a, b", 2, []], "deep": {"k": {}}, "s": 'q"uote {not: structure}\n'}))]),
    (f"<|tool_call>call:get_weather{{city:{Q}Par", None, []),  # cut by max_tokens: text
    ("<|tool_call>get_weather()<tool_call|>", None, []),  # not call:name{...}
    ("Plain answer.", "Plain answer.", []),
])
def test_parse(text, content, calls):
    assert parse_calls("gemma4", text) == ((content if calls else text), calls)


def test_detected_from_a_gemma4_template():
    assert detect_format("{{- '<|tool_call>call:' + tool_call.function.name + '{' -}}") == "gemma4"
    assert detect_format("{{ '<|tool_call|>' }}") == "granite"  # Granite's tag is another


def test_the_translation_only_grows_and_waits_for_what_may_change():
    text = f'{{city:{Q}Pa<|"|>,days:12,more:[tr'
    seen = []
    for cut in range(len(text) + 1):
        seen.append(Gemma4Arguments().feed(text[:cut]))
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    assert seen[-1] == '{"city":"Pa","days":12,"more":['  # a bare value waits for what ends it
    assert Gemma4Arguments().feed(f"{{s:{Q}ab<|") == '{"s":"ab'  # a mark may be arriving
    broken = Gemma4Arguments()
    broken.feed("{a:1]")
    assert broken.broken


_TEXT = st.text(st.characters(blacklist_characters="<"), max_size=12)  # no quote mark inside a string
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), inner,
                                                               max_size=3),
    max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(arguments=st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), _VALUES, max_size=4),
       cuts=st.lists(st.integers(1, 400), max_size=10))
def test_any_call_streams_to_the_whole_answers_arguments(arguments, cuts):
    """Rendered as Gemma 4 writes it, cut anywhere: the streamed fragments join to the whole answer's string,
    which is json.dumps of the arguments."""
    plan = ToolPlan("auto", [{"type": "function", "function": {"name": "g"}}], fmt="gemma4")
    text = "Sure." + render_calls("gemma4", [{"function": {"name": "g", "arguments": arguments}}])
    stream, deltas, start = ChoiceStream(plan), [], 0
    for cut in sorted({min(c, len(text)) for c in cuts} | {len(text)}):
        deltas += stream.feed(text[start:cut])
        start = cut
    deltas += stream.finish()
    joined = "".join(c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", []))
    assert joined == json.dumps(arguments, ensure_ascii=False) == plan.calls(text)[1][0].arguments
    assert "".join(d.get("content", "") for d in deltas) == "Sure."
