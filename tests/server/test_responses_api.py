"""``POST /v1/responses`` through the OpenAI SDK: plain, streamed, structured, with a tool, and continued."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.live import MODEL

WEATHER = {
    "type": "function", "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False},
    "strict": True,
}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
GREEDY = {"temperature": 0, "max_output_tokens": 8}


@pytest.fixture()
def client(agent_client):
    return agent_client


def test_plain_response_equals_the_chat_answer(client):
    response = client.responses.create(model=MODEL, input="Hello there", instructions="Be brief.", **GREEDY)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_in_the_documented_order(client):
    whole = client.responses.create(model=MODEL, input="Count: 1 2 3", **GREEDY)
    kinds, text = [], ""
    final = None
    for event in client.responses.create(model=MODEL, input="Count: 1 2 3", stream=True, **GREEDY):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert text == whole.output_text == final.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_structured_text_format(client):
    response = client.responses.create(
        model=MODEL, input="Is it ok?", temperature=1.0, max_output_tokens=30,
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}},
    )
    assert response.status == "completed" and isinstance(json.loads(response.output_text)["ok"], bool)


def test_a_tool_call_and_its_output_in_a_second_turn(client):
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0,
                                    max_output_tokens=60)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome")
    assert call.call_id.startswith("call_")
    second = client.responses.create(
        model=MODEL, tools=[WEATHER], **GREEDY,
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}],
    )
    assert second.usage.input_tokens > first.usage.input_tokens
    # The same turn through previous_response_id: the stored conversation continues.
    continued = client.responses.create(
        model=MODEL, tools=[WEATHER], previous_response_id=first.id, **GREEDY,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}],
    )
    assert continued.output_text == second.output_text
    assert continued.usage.input_tokens == second.usage.input_tokens


def test_streamed_tool_call_events(client):
    kinds, arguments, done = [], "", None
    for event in client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice="required",
                                         parallel_tool_calls=False, temperature=1.0, max_output_tokens=100,
                                         stream=True):
        kinds.append(event.type)
        if event.type == "response.function_call_arguments.delta":
            arguments += event.delta
        if event.type == "response.function_call_arguments.done":
            done = event.arguments
    assert "response.output_item.added" in kinds and kinds[-1] == "response.completed"
    assert arguments == done and json.loads(done)["city"] in ("Paris", "Rome")


def test_stored_responses_can_be_read_and_deleted(client, agent_http):
    response = client.responses.create(model=MODEL, input="Hi", **GREEDY)
    assert client.responses.retrieve(response.id).output_text == response.output_text
    client.responses.delete(response.id)
    assert agent_http.get(f"/v1/responses/{response.id}").status_code == 404
    unstored = client.responses.create(model=MODEL, input="Hi", store=False, **GREEDY)
    assert agent_http.get(f"/v1/responses/{unstored.id}").status_code == 404


def test_reasoning_effort_and_summary_are_hints_echoed_in_the_response(client):
    """As chat's reasoning_effort: the OpenAI Agents SDK and Codex send them to reasoning models."""
    response = client.responses.create(model=MODEL, input="Hi", reasoning={"effort": "high", "summary": "auto"},
                                       **GREEDY)
    assert response.status in ("completed", "incomplete") and response.reasoning.effort == "high"
    assert response.reasoning.summary == "auto"


def test_included_logprobs_are_the_chat_answers_whole_and_streamed(client):
    """``include: ["message.output_text.logprobs"]`` with ``top_logprobs``: each token of the message with its top k,
    the very entries chat returns for the same greedy answer; streamed, the deltas' entries join to the done
    event's, and their bytes to the text."""
    ask = dict(model=MODEL, input="Count: 1 2 3", include=["message.output_text.logprobs"], top_logprobs=2, **GREEDY)
    response = client.responses.create(**ask)
    [part] = response.output[0].content
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count: 1 2 3"}],
                                          max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    expected = [entry.model_dump() for entry in chat.choices[0].logprobs.content]
    assert [entry.model_dump() for entry in part.logprobs] == expected
    assert len(expected) == response.usage.output_tokens and all(len(e["top_logprobs"]) == 2 for e in expected)
    assert bytes(b for entry in expected for b in entry["bytes"]).decode() == response.output_text
    assert response.top_logprobs == 2

    streamed, done = [], None
    for event in client.responses.create(stream=True, **ask):
        if event.type == "response.output_text.delta":
            streamed += [entry.model_dump() for entry in event.logprobs]
        if event.type == "response.output_text.done":
            done = [entry.model_dump() for entry in event.logprobs]
        if event.type in ("response.completed", "response.incomplete"):
            final = [entry.model_dump() for entry in event.response.output[0].content[0].logprobs]
    assert streamed == done == final == expected
    plain = client.responses.create(model=MODEL, input="Count: 1 2 3", **GREEDY)
    assert plain.output[0].content[0].logprobs == [] and plain.output_text == response.output_text


def test_includes_of_tools_and_inputs_this_server_refuses_add_nothing(client):
    """Results of web or file search, code interpreter outputs, image URLs: there are never such items here (their
    tools and image inputs are a 400), so naming them changes nothing, as on OpenAI's API without those tools."""
    response = client.responses.create(model=MODEL, input="Hi", include=["file_search_call.results",
                                       "web_search_call.action.sources", "message.input_image.image_url"], **GREEDY)
    plain = client.responses.create(model=MODEL, input="Hi", **GREEDY)
    assert [item.type for item in response.output] == ["message"] and response.output_text == plain.output_text


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"reasoning": "high"}, 400, "reasoning"),
        ({"background": True, "store": False}, 400, "background"),
        ({"truncation": "auto"}, 400, "truncation"),
        ({"input": [{"type": "image_generation_call"}]}, 400, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
         "input[0].content[0].type"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
        ({"text": {"format": {"type": "grammar"}}}, 400, "text.format.type"),
        ({"include": ["message.output_text.logprobs", "reasoning.thoughts"]}, 400, "include[1]"),
        ({"include": [{"type": "logprobs"}]}, 400, "include[0]"),
        ({"top_logprobs": 21}, 400, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": -1}, 400, "top_logprobs"),
    ],
)
def test_what_is_not_implemented_is_refused_naming_the_field(agent_http, body, status, param):
    payload = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **body}
    response = agent_http.post("/v1/responses", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_the_store_is_bounded(tiny_family):
    from server.response_store import ResponseStore

    now = [0.0]
    store = ResponseStore(max_entries=2, ttl_s=10, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        store.put(name, None, {}, [])
    assert store.get("a", None) is None and store.get("b", None) is not None and len(store) == 2
    now[0] = 11
    assert store.get("c", None) is None and len(store) == 0
    off = ResponseStore(max_entries=0, ttl_s=10)
    off.put("a", None, {}, [])
    assert not off.enabled and off.get("a", None) is None


def test_the_store_is_bounded_by_bytes(tiny_family):
    """Counted in bytes of compact JSON (what each entry holds): the oldest leave until the new one fits, and
    one larger than the whole store is not kept."""
    from server.response_store import ResponseStore

    store = ResponseStore(max_entries=1000, ttl_s=60, max_bytes=10_000)
    for name in "abcd":
        assert store.put(name, None, {"text": "x" * 3000}, [])
    assert store.nbytes <= 10_000 and len(store) == 3 and store.get("a", None) is None
    assert not store.put("huge", None, {"text": "x" * 20_000}, []) and store.get("huge", None) is None
    assert store.get("d", None).response == {"text": "x" * 3000}


def test_a_stored_response_belongs_to_its_key(tiny_family):
    from server.response_store import ResponseStore

    store = ResponseStore(max_entries=10, ttl_s=60)
    store.put("r", "k1", {"id": "r"}, [{"role": "user", "content": "secret"}])
    assert store.get("r", "k2") is None and store.get("r", None) is None
    assert not store.delete("r", "k2") and store.get("r", "k1") is not None
    assert store.delete("r", "k1") and store.get("r", "k1") is None


def test_input_items_list_a_responses_own_input_as_the_sdk_reads_it(client):
    """``GET /v1/responses/{id}/input_items`` (the SDK's ``responses.input_items.list``): the response's own input
    as items with ids, newest first by default, paged with ``after`` and ``limit``."""
    first = client.responses.create(model=MODEL, input="Hello there", **GREEDY)
    listed = client.responses.input_items.list(first.id)
    assert [(i.type, i.role, i.content[0].text) for i in listed.data] == [("message", "user", "Hello there")]
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "input_text", "text": "Name a city"}]},
                    {"type": "message", "role": "assistant", "content": "Paris"},
                    {"role": "user", "content": "Another?"}]
    second = client.responses.create(model=MODEL, input=conversation, previous_response_id=first.id, **GREEDY)
    newest_first = client.responses.input_items.list(second.id).data
    assert [i.content[0].text for i in newest_first] == ["Another?", "Paris", "Name a city", "Be brief."]
    assert len({i.id for i in newest_first}) == 4 and newest_first[1].content[0].type == "output_text"
    page = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["Be brief.", "Name a city"] and page.has_more
    rest = client.responses.input_items.list(second.id, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["Paris", "Another?"] and not rest.has_more
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(second.id, limit=500)
