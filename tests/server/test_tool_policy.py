"""Tools under tool_choice auto (or none given) for a family with no tool-call format (no chat template of it
renders tools, ``ModelInfo.tool_call_format`` None): the chat is answered without the tools, with a warning, as
a chat frontend that sends its tool list with every message needs; ``required`` and a named function still
make calls (the grammar writes them). Driven by a scripted engine that records what reached it."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

import server.tools
from server.app import create_app
from server.settings import load_settings
from tests.server.test_tool_call_parsing import TOOLS, ScriptedEngine, _client

ASK = [{"role": "user", "content": "Weather in Paris?"}]
# Something a model without a format might write: it is text here, never parsed into a call.
ANSWER = ["It is ", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>']


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    monkeypatch.setattr(server.tools, "_warned_no_format", False)


def _chat(http, **fields):
    response = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 10, **fields})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def _served(fmt: str | None, pieces: list[str]) -> tuple[ScriptedEngine, TestClient]:
    engine = ScriptedEngine(fmt, pieces)
    family = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    app = create_app(engine, load_settings(overrides={"engine": family}, environ=False))
    return engine, TestClient(app, base_url="http://localhost")


@pytest.mark.parametrize("tool_choice", [None, "auto"])
def test_auto_without_a_format_answers_without_the_tools_and_warns_once(tool_choice, caplog):
    choice = {} if tool_choice is None else {"tool_choice": tool_choice}
    engine, client = _served(None, ANSWER)
    with client as http, caplog.at_level(logging.DEBUG, logger="proxy_serve"):
        first = _chat(http, tools=TOOLS, **choice)
        _chat(http, tools=TOOLS + [{"type": "function", "function": {"name": "other"}}], **choice)
    assert first["finish_reason"] == "stop" and "tool_calls" not in first["message"]
    assert first["message"]["content"] == "".join(ANSWER)  # text, never parsed: this family writes no calls
    prompt, params = engine.requests[0][1], engine.requests[0][2]
    assert prompt.tools is None and params.structured is None  # the models never see the tools
    notes = [r for r in caplog.records if "left out" in r.getMessage()]
    assert [(r.levelname, r.getMessage()[:33]) for r in notes] == [
        ("WARNING", "1 tool(s) under tool_choice auto "), ("DEBUG", "2 tool(s) under tool_choice auto ")]
    assert "no tool-call format" in notes[0].getMessage() and "debug level" in notes[0].getMessage()


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_still_call_without_a_format(tool_choice):
    call = ['{"city": "Paris"}'] if isinstance(tool_choice, dict) else ['[{"name": "get_weather", ',
                                                                       '"parameters": {"city": "Paris"}}]']
    with _client(None, call) as http:
        choice = _chat(http, tools=TOOLS, tool_choice=tool_choice)
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_family_with_a_format_still_gets_its_tools():
    with _client("hermes", ANSWER) as http:
        choice = _chat(http, tools=TOOLS)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "It is "


def test_the_responses_api_follows_the_same_policy():
    with _client(None, ["Sunny."]) as http:
        response = http.post("/v1/responses", json={"input": "Weather?", "tools": [
            {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]})
    assert response.status_code == 200, response.text
    assert [item["type"] for item in response.json()["output"]] == ["message"]
