"""Random request bodies against a real server (OpenAI's, Anthropic's and TGI's APIs, tokenizing): every answer
is a 2xx or a shaped 4xx, never a 500, and the server keeps serving. Fuzzing like this found a huge ``n`` that killed
the server (its stream sized by n before the engine process validated it), malformed GBNF grammars answered 500,
and Anthropic roles that were not strings."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.live import MODEL

KEYS = ["role", "content", "type", "text", "name", "tool_calls", "tool_call_id", "function", "arguments", "id",
        "input", "image_url", "schema", "json_schema", "properties"]
ATOMS = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
         | st.floats(allow_nan=False) | st.sampled_from(["", "x", "user", "assistant", "tool", "auto", "required",
                                                         "none", "json_object", "<think>", "</tool_call>", "\ud800"])
         | st.text(max_size=12))
VALUES = st.recursive(ATOMS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner,
                                                                                          max_size=3), max_leaves=8)
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | VALUES
# Fields whose shape matters most: near-valid values reach deeper than random ones.
SHAPED = {
    "messages": st.lists(st.fixed_dictionaries({"role": ROLES, "content": VALUES | st.text(max_size=8)},
                                               optional={"tool_calls": VALUES, "tool_call_id": VALUES,
                                                         "name": VALUES}), max_size=3),
    "guided_grammar": st.from_regex(r'[a-z :=|"\[\]()]{0,16}', fullmatch=True) | VALUES,  # GBNF-like junk
    "guided_regex": st.text(max_size=12) | VALUES,
    "n": st.integers(min_value=-(2**80), max_value=2**80) | VALUES,
    "parameters": st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                                                   "do_sample", "details", "best_of", "grammar", "adapter_id",
                                                   "top_n_tokens", "truncate", "return_full_text"]), VALUES,
                                  max_size=4) | VALUES,
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function") | VALUES,
                                             "function": st.fixed_dictionaries({"name": VALUES | st.just("f")},
                                                                               optional={"parameters": VALUES})}),
                      max_size=2) | VALUES,
}
SAMPLING = ["max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
            "logit_bias", "stream", "stream_options", "top_k", "min_p", "repetition_penalty", "stop_token_ids",
            "ignore_eos", "min_tokens", "skip_special_tokens", "allowed_token_ids", "bad_words", "prompt_logprobs",
            "alpha", "echo", "guided_json", "guided_choice", "guided_regex", "guided_grammar", "structured_outputs",
            "truncate_prompt_tokens", "priority", "return_token_ids", "model_logprobs", "logprobs", "typical_p",
            "include_stop_str_in_output", "response_format"]
CHAT = SAMPLING + ["max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                   "continue_final_message", "add_generation_prompt", "chat_template_kwargs", "thinking_token_budget",
                   "include_reasoning", "reasoning_effort", "messages"]
COMPLETIONS = SAMPLING + ["prompt", "suffix", "add_special_tokens"]
MESSAGES = ["max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "stream", "tools", "tool_choice",
            "thinking", "system", "metadata", "output_config", "messages"]
RESPONSES = ["max_output_tokens", "temperature", "tools", "tool_choice", "text", "stream", "store", "input",
             "previous_response_id", "reasoning", "include", "instructions", "top_logprobs"]

ENDPOINTS = {
    "/v1/chat/completions": ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, CHAT),
    "/v1/completions": ({"model": MODEL, "prompt": "Hello", "max_tokens": 2}, COMPLETIONS),
    "/v1/messages": ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}, MESSAGES),
    "/v1/messages/count_tokens": ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, MESSAGES),
    "/v1/responses": ({"model": MODEL, "input": "Hi", "max_output_tokens": 2, "store": False}, RESPONSES),
    "/generate": ({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, ["inputs", "parameters", "stream"]),
    "/tokenize": ({"model": MODEL, "prompt": "Hello"}, ["prompt", "messages", "inputs", "add_special_tokens",
                                                        "return_token_strs", "tools", "add_generation_prompt"]),
    "/detokenize": ({"model": MODEL, "tokens": [1, 2]}, ["tokens", "model"]),
}


def _shaped(path: str, response: httpx.Response) -> bool:
    """A 4xx in the shape of the API called (OpenAI's error object; Anthropic's for /v1/messages)."""
    body = response.json()
    if path.startswith("/v1/messages"):
        return body.get("type") == "error" and isinstance(body["error"].get("message"), str)
    if isinstance(body.get("error"), str):  # TGI's shape, from /generate (and /tokenize with TGI's body)
        return isinstance(body.get("error_type"), str)
    return isinstance(body.get("error", {}).get("message"), str)


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_random_fields_are_answered_or_refused_never_a_500(live, path, data):
    valid, fields = ENDPOINTS[path]
    names = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique=True))
    body = {**valid, **{name: data.draw(SHAPED.get(name, VALUES), label=name) for name in names}}
    # json.dumps escapes a lone surrogate as \ud800: valid JSON text that no UTF-8 string can hold
    response = httpx.post(f"{live.url}{path}", content=json.dumps(body), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text[:500])
    if response.status_code >= 400:
        assert _shaped(path, response), response.text[:500]
    elif body.get("stream") is True and path in ("/v1/chat/completions", "/v1/completions"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]


def test_the_server_serves_after_the_fuzzing(live):
    answer = httpx.post(f"{live.url}/v1/chat/completions", timeout=60, json=ENDPOINTS["/v1/chat/completions"][0])
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
