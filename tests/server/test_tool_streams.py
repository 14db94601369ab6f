"""How one choice's text becomes chat deltas under each tool plan (no server needed)."""

from __future__ import annotations

import json

from server.tools import ChoiceStream, ToolPlan, assistant_message

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
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"x":1}'
    assert sum("id" in d["tool_calls"][0] for d in deltas) == 1


def test_named_cut_by_length_keeps_length():
    plan = ToolPlan("named", TOOLS, name="f")
    message, reason = assistant_message(plan, '{"x"', "length")
    assert reason == "length" and "tool_calls" not in message


def test_required_emits_each_call_whole_at_the_end():
    plan = ToolPlan("required", TOOLS)
    text = '[{"name":"f","parameters":{"a":1}},{"name":"f","parameters":{}}]'
    deltas = _run(plan, [text[:10], text[10:]])
    indices = [d["tool_calls"][0]["index"] for d in deltas]
    assert indices == [0, 0, 1, 1]
    schema = plan.constraint.value
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert ToolPlan("required", TOOLS, parallel=False).constraint.value["maxItems"] == 1
