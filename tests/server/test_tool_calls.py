"""Tool calls through the real app and the OpenAI SDK: named, required, auto, streamed, and a two-turn loop."""

from __future__ import annotations

import json

import pytest

from tests.server.live import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Berlin"]},
                           "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
        "required": ["zone"], "additionalProperties": False}},
}


@pytest.fixture()
def client(agent_client):
    """The agent server (room for tool lists, a chat expert whose template writes tools)."""
    return agent_client


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLED = {"temperature": 1.0, "seed": 11}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _valid_weather(arguments: str) -> dict:
    value = json.loads(arguments)
    assert value["city"] in {"Paris", "Rome", "Berlin"} and value["unit"] in {"c", "f"}
    return value


def test_named_tool_choice_is_a_valid_call(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED,
                                              max_tokens=40, **SAMPLED)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _valid_weather(call.function.arguments)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_are_valid_against_their_functions(client, parallel):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                              parallel_tool_calls=parallel, max_tokens=80, **SAMPLED)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    if not parallel:
        assert len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        if call.function.name == "get_weather":
            _valid_weather(call.function.arguments)
        else:
            assert call.function.name == "get_time" and -12 <= json.loads(call.function.arguments)["zone"] <= 12
    assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_streamed_tool_calls_join_to_the_same_calls(client, tool_choice):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=80, **SAMPLED)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id:
                    assert entry["id"] is None, "an id is sent once per call"
                    entry["id"] = delta.id
                if delta.function and delta.function.name:
                    assert entry["name"] is None, "a name is sent once per call"
                    entry["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    entry["arguments"] += delta.function.arguments
    assert reasons == ["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [  # string for string
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert all(c["id"] for c in calls.values())


def test_stream_helper_accumulates_the_calls(client):
    """The SDK's own stream helper (what agents use) reassembles the deltas."""
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=40,
                                        **SAMPLED) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    _valid_weather(call.function.arguments)


def test_two_turn_tool_loop(client):
    """Call, answer the call with a tool message, and the second turn is accepted and answered."""
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=NAMED,
                                           max_tokens=40, **SAMPLED)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert second.choices[0].finish_reason in ("length", "tool_calls", "stop")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_auto_and_none_answer_text_on_a_random_model(client):
    for tool_choice in ("auto", "none"):
        response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=tool_choice,
                                                  max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        choice = response.choices[0]
        assert choice.finish_reason == "length" and isinstance(choice.message.content, str)
        assert not choice.message.tool_calls


def test_tools_reach_the_base_through_the_transcript(client, agent_http):
    plain = agent_http.post("/tokenize", json={"model": MODEL, "messages": ASK}).json()["count"]
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=1,
                                              temperature=0)
    assert response.usage.prompt_tokens > plain + 20  # the tool list and the call format were added
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=1, temperature=0)
    assert none.usage.prompt_tokens == plain


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "not among the tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "only function tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "1-64"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "not supported"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format", "cannot be combined"),
        ({"messages": [{"role": "tool", "content": "21"}]}, "messages[0].tool_call_id", "needs tool_call_id"),
        ({"functions": [WEATHER["function"]]}, "functions", "send tools"),
    ],
)
def test_bad_tool_requests_are_400s(agent_http, body, param, needle):
    payload = {"model": MODEL, "messages": ASK, "max_tokens": 5, **body}
    response = agent_http.post("/v1/chat/completions", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["param"] == param
