"""``tool_choice: auto`` end to end with a scripted engine that answers in each family's call format (a random
model never writes a call on its own): parsed into ``message.tool_calls``, streamed in OpenAI's delta shape."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import openai
import pytest
from fastapi.testclient import TestClient

from proxy_engine import FinishReason, RequestOutput
from proxy_engine.request import TokenLogprob
from server.app import create_app
from server.settings import load_settings
from tests.server.fake_engine import FakeEngine

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ANSWERS = {
    "hermes": ["Let me check. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>'],
    "llama3_json": ['{"name": "get_weather", ', '"parameters": {"city": "Paris"}}'],
    "mistral": ["Let me check. [TOOL_", 'CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'],
    "pythonic": [" [get_", 'weather(city="Paris"', ")]"],
    "qwen3_coder": ["Let me check.\n<tool_", "call>\n<function=get_weather>\n<parameter=city>\nPar",
                    "is\n</parameter>\n</function>\n</tool_call>"],
    "granite": ["<|tool_call|>[{", '"name": "get_weather", "arguments": {"ci', 'ty": "Paris"}}]'],
    "gemma4": ["Let me check.<|tool_call>call:get_", 'weather{city:<|"|>Par', 'is<|"|>}<tool_call|>'],
    "olmo3": ["Let me check.<function_", 'calls>get_weather(city="Par', 'is")</function_calls>'],
}
CONTENT = {"hermes": "Let me check. ", "llama3_json": None, "mistral": "Let me check. ", "pythonic": None,
           "qwen3_coder": "Let me check.\n", "granite": None,
           "gemma4": "Let me check.", "olmo3": "Let me check."}


class ScriptedEngine(FakeEngine):
    """Answers every request with ``pieces``, one per step, then stops."""

    def __init__(self, fmt: str, pieces: list[str], last: FinishReason = FinishReason.STOP) -> None:
        super().__init__()
        self.fmt, self.pieces, self.last = fmt, pieces, last

    async def start(self) -> None:
        await super().start()
        self.info = dataclasses.replace(self.info, tool_call_format=self.fmt)

    async def _run(self, stream, params) -> None:
        for k, piece in enumerate(self.pieces):
            await asyncio.sleep(self.step_s)
            finish = self.last if k == len(self.pieces) - 1 else None
            # With logprobs asked for, each piece is a token whose logprob names its place: -k / 10.
            logprobs = None if params.logprobs is None else [TokenLogprob(k, piece, -k / 10)]
            stream.queue.put_nowait(RequestOutput(
                request_id=stream.request_id, index=0, new_token_ids=[k], text_delta=piece, finish_reason=finish,
                prompt_tokens=stream.prompt_tokens, completion_tokens=k + 1, logprobs=logprobs))


def _client(fmt: str, pieces: list[str], last: FinishReason = FinishReason.STOP):
    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    app = create_app(ScriptedEngine(fmt, pieces, last), load_settings(overrides={"engine": engine}, environ=False))
    return TestClient(app, base_url="http://localhost")  # a localhost name: the default Host allow-list


@pytest.mark.parametrize("fmt", list(ANSWERS))
def test_auto_parses_the_family_format(fmt):
    with _client(fmt, ANSWERS[fmt]) as http:
        client = openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http, max_retries=0)
        ask = dict(model="proxy-tuned", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                   max_tokens=10)
        whole = client.chat.completions.create(**ask).choices[0]
        assert whole.finish_reason == "tool_calls"
        assert whole.message.content == CONTENT[fmt]
        [call] = whole.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

        content, calls, reasons = "", {}, []
        for chunk in client.chat.completions.create(stream=True, **ask):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                reasons += [choice.finish_reason] if choice.finish_reason else []
                for delta in choice.delta.tool_calls or []:
                    entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                    entry["name"] += (delta.function.name or "") if delta.function else ""
                    entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
        assert content == (CONTENT[fmt] or "") and reasons == ["tool_calls"]
        # string for string: the streamed arguments are the whole answer's
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]


# A call whose arguments take several steps to write (a long argument: code, a document).
SLOW_CALL = ["Sure. ", '<tool_call>{"name": "get_weather", "arguments": {"city": "', "Par", "is", ', the',
             ' capital"', "}}", "</tool_call>"]


def test_a_call_streams_its_arguments_as_they_are_written():
    """Each step's new arguments go out in that step's chunk (vLLM's streaming parsers), not at the end: a client
    sees a long argument grow. The name comes first, once complete; the pieces join to the whole answer's."""
    with _client("hermes", SLOW_CALL) as http:
        body = {"model": "proxy-tuned", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                "stream": True}
        chunks = [json.loads(line[len("data: "):]) for line in
                  http.post("/v1/chat/completions", json=body).text.splitlines()
                  if line.startswith("data: {")]
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas if d.get("tool_calls")]
        assert pieces == ["", '{"city": "', "Par", "is", ", the", ' capital"', "}"]
        assert "".join(d.get("content") or "" for d in deltas) == "Sure. "
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        whole = http.post("/v1/chat/completions", json={**body, "stream": False}).json()["choices"][0]["message"]
        assert whole["tool_calls"][0]["function"]["arguments"] == "".join(pieces) == '{"city": "Paris, the capital"}'
        assert whole["content"] == "Sure. "

        flat = [{"type": "function", **TOOLS[0]["function"]}]
        events = [json.loads(line[len("data: "):]) for line in http.post("/v1/responses", json={
            "model": "proxy-tuned", "input": "x", "tools": flat, "stream": True}).text.splitlines()
            if line.startswith("data: {")]
        argument_events = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
        assert argument_events == pieces[1:]
        done = next(e for e in events if e["type"] == "response.completed")["response"]
        assert done["output"][-1]["arguments"] == "".join(pieces)


TWO_CALLS = ['Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
             '<tool_call>{"name": "get_weather", "argu', 'ments": {"city": "Ro']


def _events(http: TestClient, body: dict) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in http.post("/v1/responses", json=body).text.splitlines()
            if line.startswith("data: {")]


@pytest.mark.parametrize("last", [FinishReason.STOP, FinishReason.LENGTH])
def test_each_call_ends_before_the_next_begins_and_a_cut_one_is_incomplete(last):
    """Calls are written one after another: the Responses API closes each function_call item (its arguments' done
    event, then the item's) when the next begins, as OpenAI streams them, not all at the end. Cut by max_tokens,
    only the call being written is incomplete; the whole chat answer keeps the whole call, the stream sent both."""
    pieces = TWO_CALLS if last == FinishReason.LENGTH else TWO_CALLS[:-1] + ['ments": {"city": "Rome"}}</tool_call>']
    with _client("hermes", pieces, last) as http:
        flat = [{"type": "function", **TOOLS[0]["function"]}]
        events = _events(http, {"model": "proxy-tuned", "input": "x", "tools": flat, "stream": True})
        order = [(e["type"], e.get("output_index")) for e in events if e["type"].startswith("response.output_item")]
        assert order == [("response.output_item.added", 0), ("response.output_item.done", 0),
                         ("response.output_item.added", 1), ("response.output_item.done", 1),
                         ("response.output_item.added", 2), ("response.output_item.done", 2)]
        final = events[-1]["response"]
        cut = last == FinishReason.LENGTH
        assert events[-1]["type"] == ("response.incomplete" if cut else "response.completed")
        assert [item["status"] for item in final["output"]] == ["completed", "completed",
                                                                "incomplete" if cut else "completed"]
        assert final["output"][1]["arguments"] == '{"city": "Paris"}'

        body = {"model": "proxy-tuned", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
        choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == ("length" if cut else "tool_calls")
        assert choice["message"]["content"] == "Sure. "
        assert [c["function"]["arguments"] for c in choice["message"]["tool_calls"]] == (
            ['{"city": "Paris"}'] if cut else ['{"city": "Paris"}', '{"city": "Rome"}'])


def test_a_call_to_an_unknown_function_is_text():
    pieces = ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>']
    with _client("hermes", pieces) as http:
        body = {"model": "proxy-tuned", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
        choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == pieces[0]
        assert "tool_calls" not in choice["message"]


def test_responses_api_returns_function_call_items():
    with _client("hermes", ANSWERS["hermes"]) as http:
        client = openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http, max_retries=0)
        flat = [{"type": "function", **TOOLS[0]["function"]}]
        response = client.responses.create(model="proxy-tuned", input="Weather?", tools=flat, max_output_tokens=10)
        kinds = [item.type for item in response.output]
        assert kinds == ["message", "function_call"] and response.output_text == "Let me check. "
        assert json.loads(response.output[1].arguments) == {"city": "Paris"}
