"""``--reasoning-parser``: a reasoning model's ``<think> ... </think>`` leaves ``content`` for ``reasoning_content``,
whole and streamed (pieces that join to the whole), with tools, and not where the request turned thinking off or
constrained its output; a real engine's stream through it; the flag and its bad values."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_engine.engine_process import async_engine_for
from server.app import create_app
from server.cli import resolve_settings
from server.reasoning import ReasoningSplitter, reasoning_end, split_reasoning
from server.settings import ConfigError, load_settings
from tests.server.live import LiveServer, make_settings
from tests.server.test_tool_call_parsing import TOOLS, ScriptedEngine

THINKING = ["<th", "ink>\nThe user greets", " me.\n</th", "ink>\n\nHello", " there!"]
CUT = ["<think>\nStill", " thinking"]  # max_tokens ran out inside the block


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        ("deepseek_r1", "<think>\nhm\n</think>\n\nHi", ("\nhm\n", "\n\nHi")),
        ("deepseek_r1", "hm</think>Hi", ("hm", "Hi")),  # the template opened the block: no start tag
        ("deepseek_r1", "still thinking", ("still thinking", None)),  # never closed: no answer yet
        ("deepseek_r1", "", (None, "")),
        ("qwen3", "<think>\nhm\n</think>\n\nHi", ("\nhm\n", "\n\nHi")),
        ("qwen3", "  <think>hm</think>Hi", ("hm", "Hi")),
        ("qwen3", "<think>cut", ("cut", None)),
        ("qwen3", "<think>", (None, None)),  # cut right after the tag: thinking, nothing said yet
        ("qwen3", "hm</think>Hi", (None, "hm</think>Hi")),  # the model opens the block itself, or there is none
        ("qwen3", "Plain answer", (None, "Plain answer")),
        ("qwen3", "<thinking> is a tag", (None, "<thinking> is a tag")),
        (None, "<think>hm</think>Hi", (None, "<think>hm</think>Hi")),
        ("mistral", "[THINK]hm[/THINK]Hi", ("hm", "Hi")),  # Magistral, Ministral 3 Reasoning
        ("mistral", "[THINK]cut", ("cut", None)),
        ("mistral", "Plain answer", (None, "Plain answer")),
        ("mistral", "<think>hm</think>Hi", (None, "<think>hm</think>Hi")),  # not its tags
        ("gemma4", "<|channel>thought\nhm<channel|>Hi", ("hm", "Hi")),  # the channel's name is not thinking
        ("gemma4", "<|channel>hm<channel|>Hi", ("hm", "Hi")),
        ("gemma4", "<|channel>thought\n", (None, None)),
        ("gemma4", "thought\nPlain", (None, "thought\nPlain")),  # no tag: no channel
        ("olmo3", "hm</think>Hi", ("hm", "Hi")),  # OLMo 3 Think's template may open the block
        ("olmo3", "<think>hm</think>Hi", ("hm", "Hi")),
        ("granite", "Here is my thought process:\nhm\nHere is my response:\nHi", ("\nhm\n", "\nHi")),  # Granite 3.2
        ("granite", "Here's my thought process: hm Here's my response: Hi", (" hm ", " Hi")),
        ("granite", "Here is a plain answer.", (None, "Here is a plain answer.")),
    ],
)
def test_split_reasoning(parser, text, expected):
    assert split_reasoning(parser, text) == expected


@settings(max_examples=150, deadline=None)
@given(text=st.sampled_from(["<think>\nab</think>\n\ncd", "ab</think>cd", "plain </think", "  <think>x</th",
                             "<thi", "a<think>b</think>c", "<think></think>", "", "[THINK]ab[/THINK]cd", "[THI",
                             " [THINK]x[/TH", "<|channel>thought\nab<channel|>cd", "<|channel>thou",
                             "<|channel>though<channel|>x", "Here is my thought process: a Here's my response: b",
                             "Here's my thought", "Here is my thought process: a Here is my"]),
       cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
       parser=st.sampled_from(["deepseek_r1", "qwen3", "mistral", "gemma4", "olmo3", "granite"]))
def test_streamed_pieces_join_to_the_whole_answers_fields(text, cuts, parser):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    splitter = ReasoningSplitter(parser)
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        pieces += splitter.feed(text[start:end])
    pieces += splitter.finish()
    reasoning, content = split_reasoning(parser, text)
    assert "".join(p for f, p in pieces if f == "reasoning_content") == (reasoning or "")
    assert "".join(p for f, p in pieces if f == "content") == (content or "")
    assert all(p for _, p in pieces)  # no empty pieces go out


def _served(pieces: list[str], parser: str | None = "qwen3", fmt: str = "hermes") -> TestClient:
    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    overrides = {"engine": engine, **({"reasoning_parser": parser} if parser else {})}
    app = create_app(ScriptedEngine(fmt, pieces), load_settings(overrides=overrides, environ=False))
    return TestClient(app, base_url="http://localhost")


def _sdk(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http, max_retries=0)


def _streamed(client: openai.OpenAI, **ask) -> tuple[str, str, list[str]]:
    reasoning, content, reasons = "", "", []
    for chunk in client.chat.completions.create(stream=True, **ask):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            reasons += [choice.finish_reason] if choice.finish_reason else []
    return reasoning, content, reasons


ASK = dict(model="proxy-tuned", messages=[{"role": "user", "content": "Hi"}], max_tokens=10)


def test_thinking_goes_to_reasoning_content_whole_and_streamed():
    with _served(THINKING) as http:
        client = _sdk(http)
        message = client.chat.completions.create(**ASK).choices[0].message
        assert message.reasoning_content == "\nThe user greets me.\n" and message.content == "\n\nHello there!"
        reasoning, content, reasons = _streamed(client, **ASK)
        assert (reasoning, content, reasons) == (message.reasoning_content, message.content, ["stop"])


def test_an_answer_cut_inside_the_thinking_has_no_content():
    with _served(CUT, parser="deepseek_r1") as http:
        choice = http.post("/v1/chat/completions", json=ASK).json()["choices"][0]
        assert choice["message"]["reasoning_content"] == "\nStill thinking" and choice["message"]["content"] is None
        reasoning, content, _ = _streamed(_sdk(http), **ASK)
        assert (reasoning, content) == ("\nStill thinking", "")


def test_include_reasoning_false_drops_it():
    with _served(THINKING) as http:
        body = {**ASK, "include_reasoning": False}
        message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message["reasoning_content"] is None and message["content"] == "\n\nHello there!"
        reasoning, content, _ = _streamed(_sdk(http), **ASK, extra_body={"include_reasoning": False})
        assert (reasoning, content) == ("", "\n\nHello there!")


@pytest.mark.parametrize("extra", [
    {"chat_template_kwargs": {"enable_thinking": False}},  # Qwen3's switch: the answer is all content
    {"response_format": {"type": "json_object"}},  # a grammar leaves no room to think
])
def test_no_parsing_where_the_request_rules_thinking_out(extra):
    with _served(["Hm</think>Hi"], parser="deepseek_r1") as http:
        message = http.post("/v1/chat/completions", json={**ASK, **extra}).json()["choices"][0]["message"]
        assert message["content"] == "Hm</think>Hi" and message["reasoning_content"] is None


@pytest.mark.parametrize(("body", "variables"), [
    ({"reasoning_effort": "low"}, {"reasoning_effort": "low", "enable_thinking": True}),
    ({"reasoning_effort": "none"}, {"reasoning_effort": "none", "enable_thinking": False}),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False, "x": 1}},  # the kwargs win
     {"reasoning_effort": "high", "enable_thinking": False, "x": 1}),
    ({}, None),
])
def test_reasoning_effort_reaches_the_chat_templates_as_vllm_passes_it(body, variables):
    """gpt-oss' and Qwen's templates branch on ``reasoning_effort``; Qwen3's and Gemma's turn thinking on and off
    with ``enable_thinking``. On chat, and on the Responses API's ``reasoning.effort``."""
    engine = ScriptedEngine("hermes", ["Hm</think>Hi"])
    models = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    settings = load_settings(overrides={"engine": models, "reasoning_parser": "deepseek_r1"}, environ=False)
    with TestClient(create_app(engine, settings), base_url="http://localhost") as http:
        message = http.post("/v1/chat/completions", json={**ASK, **body}).json()["choices"][0]["message"]
        assert engine.requests[-1][1].template_kwargs == variables
        thinking_off = variables is not None and variables["enable_thinking"] is False
        assert (message["content"], message["reasoning_content"]) == (
            ("Hm</think>Hi", None) if thinking_off else ("Hi", "Hm"))
        if "reasoning_effort" in body and "chat_template_kwargs" not in body:
            response = http.post("/v1/responses", json={"model": "proxy-tuned", "input": "Hi",
                                                        "reasoning": {"effort": body["reasoning_effort"]}})
            assert response.status_code == 200, response.text
            assert engine.requests[-1][1].template_kwargs == variables


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {**ASK, "reasoning_effort": "extreme"}, "reasoning_effort"),
    ("/v1/responses", {"model": "proxy-tuned", "input": "Hi", "reasoning": {"effort": 3}}, "reasoning.effort"),
])
def test_an_unknown_reasoning_effort_is_a_400_naming_it(path, body, param):
    with _served(THINKING) as http:
        response = http.post(path, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_tool_calls_are_read_from_the_content_after_the_thinking():
    pieces = ["<think>I need the weather.</think>", '<tool_call>{"name": "get_weather", ',
              '"arguments": {"city": "Paris"}}</tool_call>']
    with _served(pieces) as http:
        client = _sdk(http)
        choice = client.chat.completions.create(**ASK, tools=TOOLS).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content == "I need the weather."
        [call] = choice.message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        reasoning, content, reasons = _streamed(client, **ASK, tools=TOOLS)
        assert (reasoning, content, reasons) == ("I need the weather.", "", ["tool_calls"])


def test_without_a_parser_the_answer_is_unchanged():
    with _served(THINKING, parser=None) as http:
        message = http.post("/v1/chat/completions", json=ASK).json()["choices"][0]["message"]
        assert message["content"] == "".join(THINKING) and "reasoning_content" not in message
        chunks = http.post("/v1/chat/completions", json={**ASK, "stream": True}).text
        assert "reasoning_content" not in chunks


def test_a_real_engines_stream_goes_through_the_parser(tiny_family):
    """deepseek_r1 on a model that never closes a block: the whole answer is reasoning, streamed in the same
    pieces that join to the whole answer's (the real detokenizer's deltas, multi-byte characters included)."""
    served = make_settings(tiny_family, reasoning_parser="deepseek_r1")
    server = LiveServer(async_engine_for(served.engine), served).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        ask = dict(model="proxy-tuned", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0)
        message = client.chat.completions.create(**ask).choices[0].message
        plain = client.chat.completions.create(**ask, extra_body={"include_reasoning": False}).choices[0].message
        assert message.content is None and message.reasoning_content and plain.reasoning_content is None
        reasoning, content, reasons = _streamed(client, **ask)
        assert (reasoning, content, reasons) == (message.reasoning_content, "", ["length"])
    finally:
        server.stop()


def test_a_thinking_budget_closes_the_block_and_the_model_answers(tiny_family):
    """deepseek_r1 (the block opened by the template), greedy: with ``thinking_token_budget`` 3 the thinking is the
    first 3 tokens of the uncapped answer's, the closing tag is forced, and what follows is content; whole, streamed
    and through Anthropic's ``budget_tokens`` alike. Without a parser the field is a 400; ``budget_tokens`` is not."""
    from transformers import AutoTokenizer

    from proxy_engine.thinking_budget import SETTLE_TOKENS

    close = AutoTokenizer.from_pretrained(str(tiny_family.base)).encode("</think>", add_special_tokens=False)
    served = make_settings(tiny_family, reasoning_parser="deepseek_r1")
    server = LiveServer(async_engine_for(served.engine), served).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        ask = dict(model="proxy-tuned", messages=[{"role": "user", "content": "Hi"}], max_tokens=20, temperature=0,
                   logprobs=True)
        budget = {"thinking_token_budget": 3, "return_token_ids": True}
        uncapped = client.chat.completions.create(**ask, extra_body={"return_token_ids": True}).choices[0]
        choice = client.chat.completions.create(**ask, extra_body=budget).choices[0]
        own, ids = uncapped.model_extra["token_ids"], choice.model_extra["token_ids"]
        # the model's own tokens up to the budget (or a few more, to end a character written in byte tokens)
        forced_at = next(k for k in range(len(ids)) if ids[k:k + len(close)] == close)
        assert 3 <= forced_at <= 3 + SETTLE_TOKENS and ids[:forced_at] == own[:forced_at]
        first = "".join(t.token for t in uncapped.logprobs.content[:forced_at])
        assert choice.message.reasoning_content == first and uncapped.message.content is None
        assert choice.message.content  # then the model answers
        assert _streamed(client, **ask, extra_body=budget)[:2] == (choice.message.reasoning_content,
                                                                   choice.message.content)

        anthropic = {"model": "proxy-tuned", "max_tokens": 20, "temperature": 0,
                     "messages": [{"role": "user", "content": "Hi"}],
                     "thinking": {"type": "enabled", "budget_tokens": 3}}
        blocks = httpx.post(f"{server.url}/v1/messages", json=anthropic, timeout=60).json()["content"]
        assert blocks[0] == {"type": "thinking", "thinking": first, "signature": ""}
        assert blocks[1] == {"type": "text", "text": choice.message.content}
    finally:
        server.stop()
    with _served(["Hi"], parser=None) as http:
        error = http.post("/v1/chat/completions", json={**ASK, "thinking_token_budget": 3}).json()["error"]
        assert error["param"] == "thinking_token_budget" and "--reasoning-parser" in error["message"]
        body = {"model": "proxy-tuned", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}],
                "thinking": {"type": "enabled", "budget_tokens": 1024}}
        assert http.post("/v1/messages", json=body).status_code == 200


def test_the_flag_sets_the_parser_and_a_bad_name_is_named():
    settings_, _ = resolve_settings(["--base", "/m", "--reasoning-parser", "qwen3"])
    assert settings_.reasoning_parser == "qwen3"
    assert resolve_settings(["--base", "/m", "--reasoning-parser", "mistral"])[0].reasoning_parser == "mistral"
    with pytest.raises(ConfigError, match="reasoning_parser"):
        resolve_settings(["--base", "/m", "--reasoning-parser", "r1"])


def test_responses_api_returns_the_thinking_as_a_reasoning_item():
    with _served(THINKING) as http:
        client = _sdk(http)
        response = client.responses.create(model="proxy-tuned", input="Hi", max_output_tokens=10)
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert response.output[0].content[0].text == "\nThe user greets me.\n"
        assert response.output_text == "\n\nHello there!"
        events = list(client.responses.create(model="proxy-tuned", input="Hi", max_output_tokens=10, stream=True))
        kinds = [e.type for e in events]
        assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
        thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert thought == "\nThe user greets me.\n"
        final = events[-1].response
        assert [item.type for item in final.output] == ["reasoning", "message"]
        assert final.output[0].status == "completed" and final.output_text == "\n\nHello there!"
        # a client that sends the output back as input (managing the context itself) is answered
        again = client.responses.create(model="proxy-tuned", max_output_tokens=10, input=[
            {"role": "user", "content": "Hi"}, *[item.model_dump(exclude_none=True) for item in response.output],
            {"role": "user", "content": "And?"}])
        assert again.status == "completed"


def test_responses_api_includes_the_thinking_encrypted_and_logprobs_of_the_message_alone():
    """``include``: the reasoning item's ``encrypted_content`` (Codex sends it back with ``store: false``) and the
    message's logprobs, which leave out the tokens of the thinking (the token that closes it counts in it)."""
    include = ["reasoning.encrypted_content", "message.output_text.logprobs"]
    with _served(THINKING) as http:
        client = _sdk(http)
        response = client.responses.create(model="proxy-tuned", input="Hi", max_output_tokens=10, include=include,
                                           store=False)
        thinking, message = response.output
        assert base64.b64decode(thinking.encrypted_content).decode() == thinking.content[0].text
        assert [(e.token, e.logprob) for e in message.content[0].logprobs] == [(" there!", -0.4)]
        events = list(client.responses.create(model="proxy-tuned", input="Hi", max_output_tokens=10,
                                              include=include, stream=True))
        done = [e.item for e in events if e.type == "response.output_item.done"]
        assert done[0].type == "reasoning" and done[0].encrypted_content == thinking.encrypted_content
        deltas = [e.logprobs for e in events if e.type == "response.output_text.delta"]
        assert [[e.token for e in entries] for entries in deltas] == [[], [" there!"]]  # "\n\nHello" is the
        # closing token's text
        final = events[-1].response.output[1].content[0].logprobs
        assert [e.token for e in final] == [" there!"]
        # sent back as input, as Codex does, it is taken
        again = client.responses.create(model="proxy-tuned", max_output_tokens=10, store=False, include=include,
                                        input=[{"role": "user", "content": "Hi"},
                                               *[item.model_dump(exclude_none=True) for item in response.output],
                                               {"role": "user", "content": "And?"}])
        assert again.status == "completed"
        plain = client.responses.create(model="proxy-tuned", input="Hi", max_output_tokens=10)
        assert plain.output[0].encrypted_content is None and plain.output[1].content[0].logprobs == []


@pytest.mark.parametrize(("parser", "text", "end"), [
    ("deepseek_r1", "<think>\nhm\n</think>\n\nHi", 19),
    ("deepseek_r1", "hm</think>Hi", 10),
    ("deepseek_r1", "still thinking", 14),  # never closed: all of it
    ("qwen3", "  <think>hm</think>Hi", 19),
    ("qwen3", "hm</think>Hi", 0),  # qwen3 reasons only where the model opened the block
    (None, "<think>hm</think>Hi", 0),
])
def test_reasoning_ends_past_the_closing_tag(parser, text, end):
    assert reasoning_end(parser, text) == end
    reasoning, _ = split_reasoning(parser, text)
    assert (reasoning or "") in text[:end]


def test_usage_counts_the_tokens_of_the_thinking():
    """The token that closes the block counts in it (" me.\\n</th" + "ink>\\n\\nHello": 4 of the 5 tokens), whole,
    streamed and in the Responses API; none where the parser is off, the request ruled thinking out, or there is
    no parser; all of them when the thinking was cut short."""
    chat = "/v1/chat/completions"
    with _served(THINKING) as http:
        counts = http.post(chat, json=ASK).json()["usage"]
        assert counts["completion_tokens"] == 5 and counts["completion_tokens_details"] == {"reasoning_tokens": 4}
        streamed = [json.loads(line[6:]) for line in http.post(chat, json={
            **ASK, "stream": True, "stream_options": {"include_usage": True}}).text.splitlines()
            if line.startswith("data: {")]
        assert streamed[-1]["usage"] == counts
        response = _sdk(http).responses.create(model="proxy-tuned", input="Hi", max_output_tokens=10)
        assert response.usage.output_tokens_details.reasoning_tokens == 4 and response.usage.output_tokens == 5
        off = {**ASK, "chat_template_kwargs": {"enable_thinking": False}}
        assert http.post(chat, json=off).json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    with _served(CUT, parser="deepseek_r1") as http:
        assert http.post(chat, json=ASK).json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    with _served(THINKING, parser=None) as http:
        assert http.post(chat, json=ASK).json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
