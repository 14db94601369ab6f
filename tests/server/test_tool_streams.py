"""How one choice's text becomes chat deltas under each tool plan (no server needed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.tools import ChoiceStream, ToolPlan, assistant_message, finish_reason

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def _run(plan: ToolPlan, pieces: list[str]) -> list[dict]:
    stream = ChoiceStream(plan)
    deltas = []
    for piece in pieces:
        deltas += stream.feed(piece)
    return deltas + stream.finish()


def _content(deltas: list[dict]) -> str:
    return "".join(d.get("content", "") for d in deltas)


def test_auto_streams_text_and_holds_back_a_possible_marker():
    plan = ToolPlan("auto", TOOLS, fmt="hermes")
    stream = ChoiceStream(plan)
    assert stream.feed("Hello <tool") == [{"content": "Hello "}]
    assert stream.feed("s are fun") == [{"content": "<tools are fun"}]
    assert stream.finish() == []


def test_auto_turns_a_call_into_tool_call_deltas():
    plan = ToolPlan("auto", TOOLS, fmt="hermes")
    pieces = ["Let me check.", "<tool_", 'call>{"name": "f", "arguments": {"x": 1}}', "</tool_call>"]
    deltas = _run(plan, pieces)
    assert _content(deltas) == "Let me check."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "f"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"x": 1}
    message, reason = assistant_message(plan, "".join(pieces), "stop")
    assert reason == "tool_calls" and message["content"] == "Let me check."


def test_auto_with_an_unknown_function_or_broken_call_is_text():
    plan = ToolPlan("auto", TOOLS, fmt="hermes")
    text = '<tool_call>{"name": "other", "arguments": {}}</tool_call>'
    assert _content(_run(plan, [text])) == text
    assert assistant_message(plan, text, "stop") == ({"role": "assistant", "content": text}, "stop")


def test_named_streams_arguments_as_they_come():
    plan = ToolPlan("named", TOOLS, name="f")
    deltas = _run(plan, ['{"x"', ":1}"])
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    # as json.dumps writes them: the string the whole answer's arguments hold
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"x": 1}'
    assert assistant_message(plan, '{"x":1}', "stop")[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'
    assert sum("id" in d["tool_calls"][0] for d in deltas) == 1


def test_named_cut_by_length_keeps_length():
    plan = ToolPlan("named", TOOLS, name="f")
    message, reason = assistant_message(plan, '{"x"', "length")
    assert reason == "length" and "tool_calls" not in message


def test_a_required_answer_cut_short_keeps_its_whole_calls():
    """The whole answer has the calls the stream sent whole; the cut one is dropped, and the reason stays length."""
    plan = ToolPlan("required", TOOLS)
    text = '[{"name":"f","parameters":{"a":1}},{"name":"f","parameters":{"a'
    message, reason = assistant_message(plan, text, "length")
    assert reason == "length" and message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [("f", '{"a": 1}')]
    assert _joined(_run(plan, [text]))[0] == ("f", '{"a": 1}')
    assert assistant_message(plan, '[{"name":"f","param', "length") == (
        {"role": "assistant", "content": '[{"name":"f","param'}, "length")  # nothing whole: text, as before


def test_required_streams_each_call_as_it_is_written():
    plan = ToolPlan("required", TOOLS)
    text = '[{"name":"f","parameters":{"a":1}},{"name":"f","parameters":{}}]'
    deltas = _run(plan, [text[:28], text[28:]])
    indices = [d["tool_calls"][0]["index"] for d in deltas]
    assert indices == [0, 0, 0, 1, 1]  # the first call's arguments begin before the rest is written
    assert _joined(deltas) == _whole(plan, text)
    schema = plan.constraint.value
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert ToolPlan("required", TOOLS, parallel=False).constraint.value["maxItems"] == 1


def _joined(deltas: list[dict]) -> list[tuple[str, str]]:
    """The calls the deltas stream, as ``(name, arguments)``; each call's id and name come once, in its first."""
    calls: dict[int, list] = {}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            if call["index"] not in calls:
                assert call["id"] and call["type"] == "function"  # (its shape: the last test)
                calls[call["index"]] = [call["function"]["name"], ""]
            else:
                assert "id" not in call and "name" not in call["function"]
            calls[call["index"]][1] += call["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return [tuple(calls[i]) for i in sorted(calls)]


def _whole(plan: ToolPlan, text: str) -> list[tuple[str, str]]:
    message, _ = assistant_message(plan, text, "stop")
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]


TWO = TOOLS + [{"type": "function", "function": {"name": "g.v2", "parameters": {"type": "object"}}}]
ARGS = '{"city":"Paris", "days": [1,2], "note": "caf\\u00e9 \\"ok\\"", "deep": {"x": null}}'
WRITTEN = {  # each format as its models write two calls, with the content some of them allow before
    "hermes": f'Checking.\n<tool_call>\n{{"name": "f", "arguments": {ARGS}}}\n</tool_call>\n'
              f'<tool_call>\n{{"name": "g.v2", "arguments": {{}}}}\n</tool_call>',
    "llama3_json": f'<|python_tag|>{{"name": "f", "parameters": {ARGS}}}; {{"name": "g.v2", "parameters": {{}}}}',
    "mistral": f'[TOOL_CALLS][{{"name": "f", "arguments": {ARGS}}}, {{"name": "g.v2", "arguments": {{}}}}]',
    "mistral_args": f'[TOOL_CALLS]f[ARGS]{ARGS}[TOOL_CALLS]g.v2[ARGS]{{}}',
    "granite": f'<|tool_call|>[{{"name": "f", "arguments": {ARGS}}}, {{"name": "g.v2", "arguments": {{}}}}]',
}


@pytest.mark.parametrize("written", sorted(WRITTEN))
def test_auto_streams_each_format_as_it_is_written(written):
    """Fed a character at a time, the deltas join to the whole answer's content and calls, string for string,
    and a call's arguments start streaming long before the answer ends."""
    plan = ToolPlan("auto", TWO, fmt=written.split("_args")[0])
    text = WRITTEN[written]
    stream = ChoiceStream(plan)
    deltas, first_arguments_at = [], None
    for position, char in enumerate(text):
        for delta in stream.feed(char):
            deltas.append(delta)
            if first_arguments_at is None and any(c["function"]["arguments"] for c in delta.get("tool_calls", [])):
                first_arguments_at = position
    deltas += stream.finish()
    message, reason = assistant_message(plan, text, "stop")
    assert reason == "tool_calls" and len(message["tool_calls"]) == 2
    assert _joined(deltas) == _whole(plan, text)
    assert message["tool_calls"][0]["function"]["arguments"] == json.dumps(json.loads(ARGS), ensure_ascii=False)
    assert _content(deltas) == (message["content"] or "")
    assert first_arguments_at is not None and first_arguments_at < text.index(ARGS) + len(ARGS) // 2


def test_pythonic_calls_are_sent_whole_at_the_end():
    plan = ToolPlan("auto", TWO, fmt="pythonic")
    text = '[f(city="Paris", days=[1, 2]), f()]'
    stream = ChoiceStream(plan)
    assert [stream.feed(c) for c in text] == [[]] * len(text)
    deltas = stream.finish()
    assert _joined(deltas) == _whole(plan, text) == [("f", '{"city": "Paris", "days": [1, 2]}'), ("f", "{}")]


@pytest.mark.parametrize("text, arguments", [
    ('<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', '{"x": 1}'),  # the name after: read whole
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', '{"x": 1}'),  # JSON in a string
    ('<tool_call>{"name": "f", "arguments": null}</tool_call>', "{}"),
])
def test_calls_written_otherwise_still_join_to_the_whole_answer(text, arguments):
    plan = ToolPlan("auto", TWO, fmt="hermes")
    assert _joined(_run(plan, list(text))) == _whole(plan, text) == [("f", arguments)]


def test_a_call_of_no_given_tool_stops_the_calls_streamed():
    plan = ToolPlan("auto", TWO, fmt="hermes")
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "h", "arguments": {}}</tool_call>'
    deltas = _run(plan, list(text))
    assert _joined(deltas) == [("f", "{}")] and _content(deltas) == ""
    # the whole answer cannot take some calls and not others: it is text, as when the first call is unknown
    assert assistant_message(plan, text, "stop") == ({"role": "assistant", "content": text}, "stop")


def test_one_call_only_when_parallel_calls_are_off():
    plan = ToolPlan("auto", TWO, parallel=False, fmt="hermes")
    text = WRITTEN["hermes"]
    assert _joined(_run(plan, list(text))) == _whole(plan, text)[:1] == [("f", _whole(plan, text)[0][1])]


def test_a_call_cut_short_keeps_what_was_written_and_length():
    plan = ToolPlan("auto", TWO, fmt="hermes")
    text = '<tool_call>{"name": "f", "arguments": {"city": "Par'
    stream = ChoiceStream(plan)
    deltas = _run(plan, list(text))
    assert _joined(deltas) == [("f", '{"city": "Par')]
    stream.feed(text)
    stream.finish()
    assert stream.made_calls and finish_reason(stream.made_calls, "length") == "length"


CUT_IN_SECOND_CALL = dict(WRITTEN,
                          qwen3_coder='<tool_call>\n<function=f>\n<parameter=city>\nParis\n</parameter>\n</function>\n'
                                      '</tool_call>\n<tool_call>\n<function=g.v2>\n<parameter=x>\n2',
                          gemma4='<|tool_call>call:f{city:<|"|>Paris<|"|>}<tool_call|><|tool_call>call:g.v2{x:')


@pytest.mark.parametrize("written", sorted(CUT_IN_SECOND_CALL))
def test_an_auto_answer_cut_in_a_later_call_keeps_the_calls_written_whole(written):
    """max_tokens cut the second call: the stream has sent the first whole (and the second's start); the whole answer
    keeps the first, in the same string, with the same content before it and ``length``."""
    plan = ToolPlan("auto", TWO, fmt=written.split("_args")[0])
    text = CUT_IN_SECOND_CALL[written]
    text = text if written in ("qwen3_coder", "gemma4") else text[:text.rindex("{}") + 1]
    deltas = _run(plan, list(text))
    message, reason = assistant_message(plan, text, "length")
    assert reason == "length" and len(message["tool_calls"]) == 1
    assert _whole_calls(message) == _joined(deltas)[:1]
    assert (message["content"] or "") == _content(deltas)
    # ended by the model (not cut), a broken answer is still text: it was not the calls it began to be
    assert assistant_message(plan, text, "stop") == ({"role": "assistant", "content": text}, "stop")


@settings(max_examples=300, deadline=None)
@given(written=st.sampled_from(sorted(WRITTEN)), cut=st.floats(min_value=0, max_value=1))
def test_wherever_max_tokens_cuts_the_whole_answer_keeps_what_the_stream_sent_whole(written, cut):
    """Cut anywhere: the whole answer's calls are the calls the stream sent whole, in the same strings, and its content
    what the stream sent before them; with no whole call it is the text as written."""
    plan = ToolPlan("auto", TWO, fmt=written.split("_args")[0])
    text = WRITTEN[written][:round(cut * len(WRITTEN[written]))]
    stream = ChoiceStream(plan)
    deltas = stream.feed(text)
    whole = [call.index for call in stream.calls if call.whole]
    message, reason = assistant_message(plan, text, "length")
    assert reason == "length"
    if whole:
        assert _whole_calls(message) == _joined(deltas)[:len(whole)] and len(whole) in (1, 2)
        assert (message["content"] or "") == _content(deltas)
    else:
        assert message == {"role": "assistant", "content": text}


# What models write around calls, in every format: random answers built from these never break a parser.
PIECES = ['<tool_call>', '</tool_call>', '{', '}', '[', ']', '"', ':', ',', '"name"', '"arguments"', '"parameters"',
          '"f"', 'f', '(', ')', '=', 'true', 'null', '1e5', '-', '\\', '\\u00', 'x', ' ', '\n', '[TOOL_CALLS]',
          '[ARGS]', '<|python_tag|>', ';', '<function=f>', '<parameter=a>', '</parameter>', '</function>',
          '<|tool_call>', '<tool_call|>', 'call:f', '<|"|>', '<|tool_call|>', '<function_calls>', '</function_calls>',
          '<|python_start|>', '{"name": "f", "arguments": ', '{"a": 1}', 'é']
FORMATS = ["hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "granite", "gemma4", "olmo3"]


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=25), cuts=st.lists(st.integers(1, 6), max_size=30),
       fmt=st.sampled_from(FORMATS), mode=st.sampled_from(["auto", "required", "named"]),
       reason=st.sampled_from(["stop", "length"]))
def test_any_answer_is_read_without_an_error(pieces, cuts, fmt, mode, reason):
    """A model may write anything: streamed in any pieces or read whole, an answer is content or calls, never an
    exception (which would end a stream with an error)."""
    plan = ToolPlan(mode, TWO, name="f" if mode == "named" else None, fmt=fmt)
    text, stream, position = "".join(pieces), ChoiceStream(plan), 0
    for size in cuts or [len(text) or 1]:
        stream.feed(text[position:position + size])
        position += size
    stream.feed(text[position:])
    stream.finish()
    message, finished = assistant_message(plan, text, reason)
    assert finished in ("stop", "length", "tool_calls")
    assert message.get("tool_calls") or message["content"] == text


def test_an_auto_answer_cut_in_its_first_call_is_text():
    plan = ToolPlan("auto", TWO, fmt="hermes")
    text = 'Sure. <tool_call>{"name": "f", "arguments": {"city": "Par'
    assert assistant_message(plan, text, "length") == ({"role": "assistant", "content": text}, "length")


def _whole_calls(message: dict) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]


@pytest.mark.parametrize("fmt, shaped", [("mistral", r"[A-Za-z0-9]{9}"), ("hermes", r"call_[0-9a-f]{24}")])
def test_call_ids_have_the_shape_the_family_takes_back(fmt, shaped):
    """Mistral's templates refuse a call id that is not 9 letters and digits: its calls get such ids (as vLLM's
    mistral parser gives them), whole and streamed; the others OpenAI's shape."""
    import re

    text = WRITTEN["mistral"] if fmt == "mistral" else WRITTEN["hermes"]
    plan = ToolPlan("auto", TWO, fmt=fmt)
    whole = [c["id"] for c in assistant_message(plan, text, "stop")[0]["tool_calls"]]
    streamed = [c["id"] for d in _run(plan, list(text)) for c in d.get("tool_calls", []) if "id" in c]
    assert len(whole) == len(streamed) == 2 and all(re.fullmatch(shaped, i) for i in whole + streamed)
    assert len(set(whole + streamed)) == 4
