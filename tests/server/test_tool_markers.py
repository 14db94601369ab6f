"""A tool-call marker or thinking tag that the tokenizer makes a special token (Mistral's ``[TOOL_CALLS]`` and
``[THINK]``, ``<tool_call>`` in some Hermes fine-tunes) reaches its parser: an answer that may hold calls, or
thinking in such tags, is decoded with special tokens kept, as vLLM's parsers ask; without tools or a parser, or
when the client says so, they are skipped as ever."""

from __future__ import annotations

import httpx
import pytest

from proxy_engine.families import SPECIAL_TOKENS, TINY, TINY_SMALL, Family, build_model, build_tokenizer
from server.protocol import ChatCompletionRequest
from tests.server.conftest import _serve
from tests.server.live import make_settings

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = {"model": "proxy-tuned", "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 1,
       "temperature": 0}


@pytest.fixture(scope="module")
def mistral_like(tmp_path_factory):
    """The tiny family with [TOOL_CALLS] a special token, served with the mistral format."""
    root = tmp_path_factory.mktemp("marked")
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS[2:], "[TOOL_CALLS]", "[THINK]"]})
    family = Family(root / "base", root / "expert", root / "anti_expert")
    for seed, (path, shape) in enumerate([(family.base, TINY), (family.expert, TINY_SMALL),
                                          (family.anti_expert, TINY_SMALL)]):
        build_model(path, tokenizer, shape, seed=seed + 1)
    server = _serve(_settings(family))
    marker, think = tokenizer.convert_tokens_to_ids(["[TOOL_CALLS]", "[THINK]"])
    yield server, marker, think
    server.stop()


def _settings(family):
    settings = make_settings(family, reasoning_parser="mistral")
    settings.engine.tool_call_format = "mistral"
    return settings


def test_the_marker_is_kept_where_calls_may_be(mistral_like):
    server, marker, _ = mistral_like
    # the answer's one token is the marker; thinking off, so that only the tools decide (the parser keeps them too)
    forced = {**ASK, "logit_bias": {str(marker): 100}, "chat_template_kwargs": {"enable_thinking": False}}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        def content(**body) -> str:
            response = http.post("/v1/chat/completions", json={**forced, **body})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        assert content(tools=TOOLS) == "[TOOL_CALLS]"  # seen by the parser (cut by max_tokens: text)
        assert content() == ""  # no tools: special tokens are skipped, as without a parser
        assert content(tools=TOOLS, tool_choice="none") == ""
        assert content(tools=TOOLS, skip_special_tokens=True) == ""  # the client's word wins


def test_the_thinking_tag_is_kept_for_the_mistral_parser(mistral_like):
    server, _, think = mistral_like
    forced = {**ASK, "logit_bias": {str(think): 100}}  # the answer opens its thinking, and is cut there
    with httpx.Client(base_url=server.url, timeout=60) as http:
        def message(**body) -> dict:
            response = http.post("/v1/chat/completions", json={**forced, **body})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]

        assert message()["content"] is None  # inside the thinking: no answer yet
        # the parser stands aside where thinking is off: the tag is skipped, as any special token
        assert message(chat_template_kwargs={"enable_thinking": False})["content"] == ""
        assert message(skip_special_tokens=True)["content"] == ""  # the client's word wins


@pytest.mark.parametrize("fmt, choice, kept", [
    ("mistral", None, True), ("hermes", "auto", True), ("qwen3_coder", None, True), ("gemma4", None, True),
    ("granite", None, False),  # parsed without its <|tool_call|>
    ("llama3_json", None, False),  # parsed without its <|python_tag|>
    ("pythonic", None, False),
    ("hermes", "required", False),  # the constraint writes the calls: no marker
    ("hermes", "none", False),
])
def test_which_answers_keep_special_tokens(fmt, choice, kept):
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                    tool_choice=choice)
    assert request.sampling_params(fmt).skip_special_tokens is (not kept)


@pytest.mark.parametrize("parser, kept", [("mistral", True), ("gemma4", True), ("qwen3", False), ("deepseek_r1", False),
                                          (None, False)])
def test_which_reasoning_parsers_keep_special_tokens(parser, kept):
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    assert request.sampling_params("hermes", reasoning=parser).skip_special_tokens is (not kept)
