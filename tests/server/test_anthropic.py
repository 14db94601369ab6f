"""Anthropic's Messages API (server/anthropic.py) through Anthropic's own client: the conversation as the chat
path receives it, thinking / text / tool_use blocks whole and streamed, stop reasons, usage, token counts,
refusals in Anthropic's shape, the x-api-key header; then on the real tiny engine, against the chat endpoint's
answers to the same request."""

from __future__ import annotations

import json

import anthropic
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import load_settings
from tests.server.live import MODEL
from tests.server.test_reasoning import THINKING
from tests.server.test_tool_call_parsing import ANSWERS, SLOW_CALL, ScriptedEngine

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}


def _served(pieces: list[str], parser: str | None = None, **server) -> tuple[TestClient, ScriptedEngine]:
    engine = ScriptedEngine("hermes", pieces)
    models = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    overrides = {"engine": models, **({"reasoning_parser": parser} if parser else {}), **server}
    return TestClient(create_app(engine, load_settings(overrides=overrides, environ=False)),
                      base_url="http://localhost"), engine


def _sdk(http, api_key: str = "x") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=str(http.base_url), api_key=api_key, http_client=http, max_retries=0)


def _streamed(client: anthropic.Anthropic, **ask) -> tuple[list[str], anthropic.types.Message]:
    with client.messages.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        return kinds, stream.get_final_message()


def test_thinking_and_text_blocks_whole_and_streamed():
    http, _ = _served(THINKING, parser="qwen3")
    with http:
        client = _sdk(http)
        message = client.messages.create(**ASK)
        assert [block.type for block in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == "\nThe user greets me.\n"
        assert message.content[1].text == "\n\nHello there!"
        assert message.stop_reason == "end_turn" and message.stop_sequence is None and message.role == "assistant"
        assert message.id.startswith("msg_") and message.model == MODEL
        assert message.usage.output_tokens == len(THINKING)
        kinds, streamed = _streamed(client, **ASK)
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
        assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2
        assert streamed.model_dump(exclude={"id"}) == message.model_dump(exclude={"id"})


def test_a_tool_call_is_a_tool_use_block_whole_and_streamed():
    """tool_choice auto with the family's call format in the answer: text, then a tool_use block whose input is
    the call's arguments; stop_reason tool_use. Streamed, the input arrives as input_json_delta pieces."""
    http, engine = _served(ANSWERS["hermes"])
    with http:
        client = _sdk(http)
        ask = {**ASK, "tools": [WEATHER]}
        message = client.messages.create(**ask)
        text, call = message.content
        assert text.type == "text" and text.text == "Let me check. "
        assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
        assert message.stop_reason == "tool_use"
        kinds, streamed = _streamed(client, **ask)
        assert "content_block_delta" in kinds
        assert streamed.content[1].input == {"city": "Paris"} and streamed.stop_reason == "tool_use"
        _, prompt, params, _ = engine.requests[0]
        assert prompt.tools == [{"type": "function", "function": {
            "name": "get_weather", "parameters": WEATHER["input_schema"], "description": "The weather in a city."}}]


def test_a_tool_use_input_streams_as_it_is_written():
    http, _ = _served(SLOW_CALL)
    with http, _sdk(http).messages.stream(**ASK, tools=[WEATHER]) as stream:
        partial = [event.delta.partial_json for event in stream
                   if event.type == "content_block_delta" and event.delta.type == "input_json_delta"]
        message = stream.get_final_message()
    assert partial == ['{"city": "', "Par", "is", ", the", ' capital"', "}"]
    assert message.content[1].input == {"city": "Paris, the capital"} and message.stop_reason == "tool_use"


def test_the_conversation_reaches_the_chat_path_as_chat_messages():
    """system, a tool_use turn and its tool_result, sampling fields: what the chat endpoint would have received."""
    http, engine = _served(["Sunny."])
    with http:
        _sdk(http).messages.create(
            model=MODEL, max_tokens=7, system=[{"type": "text", "text": "Be brief."}],
            stop_sequences=["\n\n"], metadata={"user_id": "u-1"},
            extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20},  # no longer the SDK's own arguments
            tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True},
            thinking={"type": "disabled"},
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Use the tool.", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sun"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "late", "is_error": True},
                    {"type": "text", "text": "And so?"}]},
            ])
        _, prompt, params, _ = engine.requests[0]
        assert prompt.messages == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "toolu_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "content": "Sun", "tool_call_id": "toolu_1"},
            {"role": "tool", "content": "Error: late", "tool_call_id": "toolu_2"},
            {"role": "user", "content": "And so?"},
        ]
        assert prompt.template_kwargs == {"enable_thinking": False}
        http.post("/v1/messages", json={**ASK, "messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "ctx", "content": "Hi"}]})
        assert engine.requests[1][1].messages == [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}]
        assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (7, 0.5, 0.9, 20)
        assert params.stop == ["\n\n"] and params.structured is not None  # "any": a call is required, by grammar


def test_count_tokens_is_the_rendered_prompts_length():
    http, _ = _served(["x"])
    with http:
        counted = _sdk(http).messages.count_tokens(model=MODEL, messages=ASK["messages"], system="Be brief.")
        tokenized = http.post("/tokenize", json={"model": MODEL, "messages": [
            {"role": "system", "content": "Be brief."}, *ASK["messages"]]}).json()
        assert counted.input_tokens == tokenized["count"] > 0


@pytest.mark.parametrize(
    ("change", "status", "error_type", "named"),
    [
        ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
         "invalid_request_error", "messages[0].content[0]"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error",
         "server tools"),
        ({"tool_choice": {"type": "sometimes"}}, 400, "invalid_request_error", "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_request_error", "messages[0].role"),
        ({"model": "claude-sonnet-4-5"}, 404, "not_found_error", "claude-sonnet-4-5"),
        ({"output_config": {"format": {"type": "xml"}}}, 400, "invalid_request_error", "output_config.format"),
        # found by fuzzing, each a 500: a role that is no string, a conversation with nothing in it
        ({"messages": [{"role": ["user"], "content": "x"}]}, 400, "invalid_request_error", "messages[0].role"),
        ({"messages": [{"role": {}, "content": "x"}]}, 400, "invalid_request_error", "messages[0].role"),
        ({"messages": [{"role": "user", "content": []}]}, 400, "invalid_request_error", "every turn is empty"),
    ],
)
def test_refusals_are_anthropic_errors(change, status, error_type, named):
    http, _ = _served(["x"])
    with http:
        body = {k: v for k, v in {**ASK, **change}.items() if v is not None}
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            if path.endswith("count_tokens"):
                if "messages" not in change:
                    continue
                body = {"model": MODEL, "messages": change["messages"]}
            response = http.post(path, json=body)
            assert response.status_code == status, response.text
            answer = response.json()
            assert answer["type"] == "error" and answer["error"]["type"] == error_type
            assert named in answer["error"]["message"], answer
        assert http.post("/v1/messages", json=ASK).status_code == 200  # and it keeps serving


def test_the_clients_x_api_key_header_is_a_key():
    http, _ = _served(["Hi"], api_keys=["sk-anthropic"])
    with http:
        assert _sdk(http, "sk-anthropic").messages.create(**ASK).content[0].text == "Hi"
        with pytest.raises(anthropic.AuthenticationError):
            _sdk(http, "sk-wrong").messages.create(**ASK)
        with pytest.raises(anthropic.NotFoundError):
            _sdk(http, "sk-anthropic").messages.create(**{**ASK, "model": "claude-opus-4-1"})


# --- the real tiny engine ----------------------------------------------------------------------------------------
def _chat(http, **body) -> dict:
    response = http.post("/v1/chat/completions", json={"model": MODEL, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_greedy_message_is_the_greedy_chat_answer(live, http):
    client = anthropic.Anthropic(base_url=live.url, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Tell me about the village."}]
    reference = _chat(http, messages=[{"role": "system", "content": "Be brief."}, *messages], max_tokens=12)
    greedy = {"extra_body": {"temperature": 0}}
    message = client.messages.create(model=MODEL, max_tokens=12, system="Be brief.", messages=messages, **greedy)
    choice = reference["choices"][0]
    assert message.content[0].text == choice["message"]["content"]
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[choice["finish_reason"]]
    usage = reference["usage"]
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == usage["prompt_tokens"]
    assert message.usage.output_tokens == usage["completion_tokens"]
    streamed = client.messages.stream(model=MODEL, max_tokens=12, system="Be brief.", messages=messages, **greedy)
    with streamed as stream:
        assert "".join(stream.text_stream) == message.content[0].text
    counted = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=messages)
    assert counted.input_tokens == usage["prompt_tokens"]


def test_a_final_assistant_turn_is_a_prefill_the_models_continue(http):
    """Anthropic's prefill: the answer continues the final assistant turn (chat's continue_final_message)."""
    turns = [{"role": "user", "content": "Tell me about the village."},
             {"role": "assistant", "content": "The village"}]
    message = http.post("/v1/messages", json={**ASK, "messages": turns, "max_tokens": 8, "temperature": 0}).json()
    reference = _chat(http, messages=turns, max_tokens=8, continue_final_message=True, add_generation_prompt=False)
    assert message["content"][0]["text"] == reference["choices"][0]["message"]["content"]
    counted = http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": turns}).json()
    assert counted["input_tokens"] == reference["usage"]["prompt_tokens"]


def test_a_stop_sequence_ends_the_message_and_is_named(http):
    free = http.post("/v1/messages", json={**ASK, "max_tokens": 16, "temperature": 0}).json()["content"][0]["text"]
    visible = free.strip()
    assert len(visible) >= 4, f"the tiny model said too little to test stop sequences: {free!r}"
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    message = http.post("/v1/messages", json={**ASK, "max_tokens": 16, "temperature": 0,
                                              "stop_sequences": [stop]}).json()
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == stop
    assert message["content"][0]["text"] == free[: free.index(stop)]


def test_a_named_tool_and_an_output_schema_are_followed(agent_http):
    """tool_choice {type: tool}: the grammar makes the random model call it, with input that fits the schema;
    output_config.format: the text is JSON that fits it. Streamed, the input's pieces join to the same JSON."""
    cities = {**WEATHER, "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                          "required": ["city"], "additionalProperties": False}}
    ask = {"model": MODEL, "max_tokens": 40, "temperature": 0, "messages": [{"role": "user", "content": "Weather?"}],
           "tools": [cities], "tool_choice": {"type": "tool", "name": "get_weather"}}
    message = agent_http.post("/v1/messages", json=ask).json()
    [call] = [block for block in message["content"] if block["type"] == "tool_use"]
    assert call["name"] == "get_weather" and call["input"]["city"] in ("Paris", "Rome")
    assert message["stop_reason"] == "tool_use"
    with agent_http.stream("POST", "/v1/messages", json={**ask, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines]
    pieces = "".join(e["delta"]["partial_json"] for e in events
                     if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(pieces) == call["input"]

    schema = {"type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"],
              "additionalProperties": False}
    answer = agent_http.post("/v1/messages", json={
        "model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": "Sunny?"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}}}).json()
    assert isinstance(json.loads(answer["content"][0]["text"])["sunny"], bool)


def test_a_call_cut_short_keeps_its_pieces_and_an_empty_input():
    from server.anthropic import BlockStream

    blocks = BlockStream()
    events = blocks.feed({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]})
    events += blocks.feed({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]})
    events += blocks.close()
    assert blocks.blocks == [{"type": "tool_use", "id": "call_1", "name": "f", "input": {}}] and blocks.made_calls
    assert [e.split("\n")[0] for e in events] == ["event: content_block_start", "event: content_block_delta",
                                                  "event: content_block_stop"]


def test_a_failure_after_the_stream_began_is_an_error_event():
    from tests.server.fake_engine import FakeEngine

    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    app = create_app(FakeEngine(fail_at_token=2), load_settings(overrides={"engine": engine}, environ=False))
    with TestClient(app, base_url="http://localhost") as http:
        with http.stream("POST", "/v1/messages", json={**ASK, "stream": True}) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
        assert lines[0] == "event: message_start" and lines[-2] == "event: error"
        error = json.loads(lines[-1][len("data: "):])
        assert error["type"] == "error" and error["error"]["type"] == "api_error" and error["error"]["message"]
        with pytest.raises(anthropic.APIStatusError):
            with _sdk(http).messages.stream(**ASK) as stream:
                list(stream)


def test_the_model_list_reads_in_both_sdks(live):
    """GET /v1/models: OpenAI's list and cards, with the fields Anthropic's client reads on the same path."""
    import openai

    models = anthropic.Anthropic(base_url=live.url, api_key="x", max_retries=0).models.list()
    ids = [model.id for model in models.data]
    assert ids[0] == MODEL and f"{MODEL}:base" in ids and not models.has_more
    assert models.data[0].type == "model" and models.data[0].display_name == MODEL
    assert models.data[0].created_at.year >= 2026
    assert anthropic.Anthropic(base_url=live.url, api_key="x").models.retrieve(MODEL).id == MODEL
    assert [m.id for m in openai.OpenAI(base_url=f"{live.url}/v1", api_key="x").models.list().data] == ids


def test_a_missing_key_is_refused_in_the_shape_of_the_api_called():
    """The key gate answers before any route: on Anthropic's and TGI's paths in their shapes, OpenAI's elsewhere."""
    http, _ = _served(["Hi"], api_keys=["sk-anthropic"])
    with http:
        messages = http.post("/v1/messages", json=ASK)
        assert messages.status_code == 401 and messages.json()["error"]["type"] == "authentication_error"
        assert messages.json()["type"] == "error" and messages.headers["www-authenticate"] == "Bearer"
        generate = http.post("/generate", json={"inputs": "Hi"})
        assert generate.status_code == 401 and set(generate.json()) == {"error", "error_type"}
        chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK["messages"]})
        assert chat.status_code == 401 and chat.json()["error"]["code"] == "invalid_api_key"
