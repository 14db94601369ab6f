"""Bad input never gets a 500 and every refusal is OpenAI-shaped (TGI's and Anthropic's routes: in theirs).

Two parts: a catalogue of the inputs the issue names (wrong types, huge ``n`` and ``max_tokens``, negative and
NaN numbers, empty prompts and messages, lists of prompts, token-id prompts, invalid UTF-8, lone surrogates, a
10 MB body, unknown roles, ``logit_bias`` outside the vocabulary, too many stop strings); then property-based
fuzzing with hypothesis of both generation endpoints (every field valid, at an edge, or any JSON at all), of
raw bytes, and of every other operation the app's OpenAPI schema lists.

The server is real (tiny family, ``max_model_len`` 32 so that an accepted request costs little). The runs are
derandomized (the same cases on every CI run); ``PROXY_FUZZ_EXAMPLES=<n>`` sets the examples per property
and ``PROXY_FUZZ_RANDOM=1`` draws new ones. The module prints how many cases it sent and their statuses.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.support import error_of, events_of, serve
from tests.server.live import MODEL

EXAMPLES = int(os.environ.get("PROXY_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("PROXY_FUZZ_RANDOM") != "1", database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
MAX_MODEL_LEN = 32
BODY_LIMIT = 1024 * 1024
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ALLOWED = {200, 400, 404, 413}  # what bad (or good) input may get from an idle server; never 5xx
# TGI's API (server/tgi.py) refuses with 422 {"error", "error_type"}; the body limit's 413 is the middleware's.
TGI_PATHS = ("/generate", "/generate_stream", "/")
TGI_SHAPED = (*TGI_PATHS, "/chat_tokenize")  # the paths that refuse in TGI's shape
TGI_ALLOWED = {200, 413, 422}
SENT: Counter = Counter()  # (endpoint, status) for the summary


@pytest.fixture(scope="module")
def server(tiny_family):
    live, _ = serve(tiny_family, limits={"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16},
                    max_body_bytes=BODY_LIMIT)
    yield live
    live.stop()
    total = sum(SENT.values())
    statuses = Counter()
    for (_, status), count in SENT.items():
        statuses[status] += count
    by_endpoint = Counter()
    for (endpoint, _), count in SENT.items():
        by_endpoint[endpoint] += count
    print(f"\nbad-input cases sent: {total}; by status {dict(sorted(statuses.items()))}; "
          f"by endpoint {dict(sorted(by_endpoint.items()))}")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def send(http: httpx.Client, path: str, body=None, *, raw: bytes | None = None, method: str = "POST",
         headers: dict | None = None) -> httpx.Response:
    """Send one case and check what every response must satisfy; return the response for more checks."""
    if raw is None and method == "POST":
        raw = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity go out as Python writes them
    wants_stream = isinstance(body, dict) and body.get("stream") is True
    request = http.build_request(method, path, content=raw,
                                 headers={"content-type": "application/json", **(headers or {})})
    response = http.send(request, stream=True)
    try:
        if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
            events = events_of(response.iter_lines())
            check_stream(events)
        else:
            response.read()
    finally:
        response.close()
    SENT[(path.split("?")[0] if not path.startswith("/v1/models/") else "/v1/models/{id}", response.status_code)] += 1
    # /tokenize is TGI's when the body holds "inputs", /invocations when it holds neither messages nor prompt;
    # Anthropic's routes refuse in Anthropic's shape.
    tgi = path in TGI_SHAPED or (isinstance(body, dict) and "inputs" in body and (
        path == "/tokenize" or (path == "/invocations" and "messages" not in body and "prompt" not in body)))
    allowed = TGI_ALLOWED if tgi else ALLOWED
    assert response.status_code in allowed, (path, body if raw is None else raw[:200], response.status_code)
    if tgi and response.status_code == 422:
        tgi_error_of(response)
    elif path.split("?")[0] in ANTHROPIC_PATHS and response.status_code >= 400:
        anthropic_error_of(response)
    elif response.status_code >= 400:
        error_of(response)
    elif not wants_stream and path in (COMPLETIONS, CHAT):
        check_answer(response.json())
    return response


ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def anthropic_error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    assert body["error"]["type"].endswith("_error") or body["error"]["type"] == "request_too_large", body
    assert "Traceback" not in response.text
    return body["error"]


def tgi_error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"] and body["error_type"] == "validation", body
    assert "Traceback" not in response.text
    return body


def check_stream(events: list) -> None:
    if events and isinstance(events[-1], dict) and "index" in events[-1]:  # TGI's: no [DONE], text at the end
        assert not any("error" in e for e in events), events[-3:]
        assert isinstance(events[-1]["generated_text"], str) and [e["index"] for e in events] == list(
            range(1, len(events) + 1))
        return
    assert events and events[-1] == "[DONE]", events[-3:]
    assert not any(isinstance(e, dict) and "error" in e for e in events), events[-3:]
    finals = [c for e in events[:-1] if e.get("choices") for c in e["choices"] if c.get("finish_reason")]
    indexes = [c["index"] for c in finals]
    assert len(indexes) == len(set(indexes)) and all(c["finish_reason"] in ("stop", "length") for c in finals)


def check_answer(body: dict) -> None:
    assert body["object"] in ("text_completion", "chat.completion") and body["choices"], body
    for choice in body["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# --------------------------------------------------------------------------------------------- the catalogue
HUGE = 10**40
NAN, INF = math.nan, math.inf
USER = [{"role": "user", "content": "hi"}]

CATALOGUE = [
    # wrong types
    (COMPLETIONS, {"prompt": "x", "max_tokens": "many"}, 400),
    (COMPLETIONS, {"prompt": "x", "n": [1]}, 400),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400),
    (COMPLETIONS, {"prompt": "x", "stream": "yes please"}, 400),
    (COMPLETIONS, {"prompt": "x", "stop": 5}, 400),
    (COMPLETIONS, {"prompt": "x", "logit_bias": [1, 2]}, 400),
    (COMPLETIONS, {"prompt": {"text": "x"}}, 400),
    (COMPLETIONS, {"prompt": "x", "model": 7}, 400),
    (CHAT, {"messages": "hello"}, 400),
    (CHAT, {"messages": [{"role": 5, "content": "x"}]}, 400),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400),
    (CHAT, {"messages": [{"role": "user", "content": ["x"]}]}, 400),
    (CHAT, {"messages": USER, "logprobs": "maybe"}, 400),
    # huge numbers
    (COMPLETIONS, {"prompt": "x", "n": HUGE}, 400),
    (COMPLETIONS, {"prompt": "x", "n": 17}, 400),
    # past the context left: a 400 naming the lengths (context_length_exceeded), as OpenAI and vLLM answer
    (COMPLETIONS, {"prompt": "x", "max_tokens": HUGE}, 400),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 2**63}, 400),
    (CHAT, {"messages": USER, "max_completion_tokens": HUGE}, 400),
    (COMPLETIONS, {"prompt": "x", "top_k": HUGE}, 400),
    (COMPLETIONS, {"prompt": "x", "top_k": 2**62, "max_tokens": 2}, 200),
    (COMPLETIONS, {"prompt": "x", "seed": HUGE}, 400),
    (COMPLETIONS, {"prompt": "x", "seed": 2**63 - 1, "n": 3, "max_tokens": 2}, 200),
    (COMPLETIONS, {"prompt": "x", "logprobs": HUGE}, 400),
    (COMPLETIONS, {"prompt": "x", "min_tokens": HUGE}, 400),
    (COMPLETIONS, {"prompt": "x", "temperature": 1e308}, 400),  # float32 makes it inf, and -inf / inf NaN
    (COMPLETIONS, {"prompt": "x", "temperature": 1e4, "top_k": 3}, 200),
    (COMPLETIONS, {"prompt": "x", "temperature": 1e-39}, 200),  # below 1e-5: greedy (was a 500 in prefill)
    (COMPLETIONS, {"prompt": "x", "temperature": 5e-324, "n": 2}, 200),
    (CHAT, {"messages": USER, "temperature": 1e-39, "top_p": 0.5}, 200),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 1e-300}, 400),  # was a 500 in decode
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 1e300}, 400),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0.01, "max_tokens": 4}, 200),
    (CHAT, {"messages": USER, "repetition_penalty": 100, "max_tokens": 4}, 200),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": HUGE}, 400),
    # negative and NaN numbers
    (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, 400),
    (COMPLETIONS, {"prompt": "x", "n": -3}, 400),
    (COMPLETIONS, {"prompt": "x", "temperature": -0.5}, 400),
    (COMPLETIONS, {"prompt": "x", "seed": -7, "max_tokens": 2}, 200),
    (COMPLETIONS, {"prompt": "x", "temperature": NAN}, 400),
    (COMPLETIONS, {"prompt": "x", "top_p": NAN}, 400),
    (COMPLETIONS, {"prompt": "x", "max_tokens": NAN}, 400),
    (COMPLETIONS, {"prompt": "x", "alpha": NAN}, 400),
    (COMPLETIONS, {"prompt": "x", "alpha": [INF]}, 400),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": -INF}, 400),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"1": NAN}}, 400),
    (COMPLETIONS, {"prompt": NAN}, 400),
    (CHAT, {"messages": USER, "top_logprobs": -1, "logprobs": True}, 400),
    # empty prompts and messages
    (COMPLETIONS, {"prompt": ""}, 400),
    (COMPLETIONS, {"prompt": [""]}, 400),
    (COMPLETIONS, {"prompt": []}, 400),
    (COMPLETIONS, {"prompt": [[]]}, 400),
    (COMPLETIONS, {}, 400),
    (CHAT, {"messages": []}, 400),
    (CHAT, {}, 400),
    (CHAT, {"messages": [{"role": "user", "content": ""}], "max_tokens": 2}, 200),
    (CHAT, {"messages": [{"role": "user"}], "max_tokens": 2}, 200),  # content null/absent: empty text
    # lists of prompts and token ids
    (COMPLETIONS, {"prompt": ["a", "b"], "max_tokens": 2}, 200),
    (COMPLETIONS, {"prompt": [[1, 2], [3]], "max_tokens": 2, "n": 2}, 200),
    (COMPLETIONS, {"prompt": ["a", []]}, 400),
    (COMPLETIONS, {"prompt": ["x"] * 65}, 400),
    (COMPLETIONS, {"prompt": [[1, 2], list(range(1, 40))]}, 400),  # the second is past the context of 32
    (COMPLETIONS, {"prompt": [1, 2, 3], "max_tokens": 2}, 200),
    (COMPLETIONS, {"prompt": [[1, 2, 3]], "max_tokens": 2}, 200),
    (COMPLETIONS, {"prompt": [-1, 2]}, 400),
    (COMPLETIONS, {"prompt": [10**6]}, 400),
    (COMPLETIONS, {"prompt": [HUGE]}, 400),
    (COMPLETIONS, {"prompt": [True, False]}, 400),
    (COMPLETIONS, {"prompt": [1.5]}, 400),
    (COMPLETIONS, {"prompt": list(range(1, 40))}, 400),  # past the context of 32
    (COMPLETIONS, {"prompt": [1, 2], "echo": True, "max_tokens": 2}, 200),
    # lone surrogates (valid JSON escapes, invalid Unicode)
    (COMPLETIONS, {"prompt": "a\ud800b"}, 400),
    (COMPLETIONS, {"prompt": ["\udfff"]}, 400),
    (COMPLETIONS, {"prompt": "x", "stop": ["\ud83d"]}, 400),
    (CHAT, {"messages": [{"role": "user", "content": "\ud83d"}]}, 400),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}]}, 400),
    (CHAT, {"messages": [{"role": "\ud800", "content": "x"}]}, 400),
    (COMPLETIONS, {"prompt": "x", "model": "\ud800"}, 404),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"\ud800": 1}}, 400),
    (COMPLETIONS, {"prompt": "🙂 déjà vu 東京", "max_tokens": 2}, 200),  # real non-ASCII is fine
    # unknown roles and parts
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    # logit_bias ids outside the vocabulary, stop_token_ids too
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"512": 1}}, 400),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"-1": 1}}, 400),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {str(HUGE): 1}}, 400),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"token": 1}}, 400),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": 101}}, 400),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [512]}, 400),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-1]}, 400),
    (CHAT, {"messages": USER, "logit_bias": {"100000": -100}}, 400),
    # per-request lists past their limits
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [1] * 257}, 400),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [1] * 256, "max_tokens": 2}, 200),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400),
    (CHAT, {"messages": USER, "logit_bias": {str(i): 1 for i in range(300)}, "max_tokens": 2}, 200),
    (CHAT, {"messages": USER * 2049}, 400),
    # stop lists too long (or too long a stop)
    (COMPLETIONS, {"prompt": "x", "stop": ["s"] * 17}, 400),
    (COMPLETIONS, {"prompt": "x", "stop": ["s" * 257]}, 400),
    (CHAT, {"messages": USER, "stop": [str(i) for i in range(1000)]}, 400),
    (COMPLETIONS, {"prompt": "x", "stop": [], "max_tokens": 2}, 200),
    # things a server may not do for a request
    (CHAT, {"messages": USER, "chat_template": "{{ 'x' }}"}, 400),
    (CHAT, {"messages": USER, "chat_template": "/etc/passwd"}, 400),
    (COMPLETIONS, {"prompt": "x", "model": "/etc/passwd"}, 404),
    (COMPLETIONS, {"prompt": "x", "model": "../../proxy-tuned"}, 404),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, 400),
    (COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 1}, 200),  # prompt logprobs
    (COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0}, 200),
    (COMPLETIONS, {"prompt": "x", "echo": True, "max_tokens": 0}, 200),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400),
]


@pytest.mark.parametrize(("path", "body", "status"), CATALOGUE,
                         ids=[f"{i}-{'chat' if p == CHAT else 'completions'}" for i, (p, _, _) in enumerate(CATALOGUE)])
def test_catalogue(http, path, body, status):
    body = {"model": MODEL, **body} if "model" not in body else body
    if status == 200:
        body.setdefault("max_tokens", 2) if path == COMPLETIONS else None
    response = send(http, path, body)
    assert response.status_code == status, response.text


@pytest.mark.parametrize("stream", [False, True])
def test_catalogue_streaming_refusals_are_plain_http_errors(http, stream):
    """A refusal happens before the 200: even with ``stream: true`` it is a JSON error, not an event."""
    response = send(http, COMPLETIONS, {"prompt": "x", "n": 0, "stream": stream})
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("raw", [
    b"\xff\xfe\x00", b'{"prompt": "\xff\xfe", "max_tokens": 2}', b'{"prompt": "caf\xc3"}', b"", b"{", b"null", b"[]",
    b'"prompt"', b"12", b'{"prompt": "x", "max_tokens": 2,}', b'{"prompt": "\\ud800"}', b"{'prompt': 'x'}",
    b'{"prompt": "x"}' * 2, b'{"prompt": "x", "n": NaN}', b'{"prompt": "x", "temperature": Infinity}',
])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_raw_bodies(http, path, raw):
    assert send(http, path, raw=raw).status_code == 400


def test_ten_megabyte_body_is_413(http):
    """Refused by the configurable size limit (``max_body_bytes``), declared or counted as it arrives."""
    big = json.dumps({"model": MODEL, "prompt": "x" * (10 * 1024 * 1024)}).encode()
    error = error_of(send(http, COMPLETIONS, raw=big), 413)
    assert error["code"] == "request_too_large" and str(BODY_LIMIT) in error["message"]

    def chunks():
        for start in range(0, len(big), 256 * 1024):
            yield big[start:start + 256 * 1024]

    response = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    SENT[(CHAT, response.status_code)] += 1
    assert error_of(response, 413)["code"] == "request_too_large"


# ----------------------------------------------------------------------------------------------- the fuzzing
WEIRD = ["", " ", "\x00", "\ud800", "a\udfffb", "🙂", "\u202e", "x" * 300, "<|endoftext|>", "<|user|>",
         "{{ 7*7 }}", "{% include '/etc/passwd' %}", "../../etc/passwd", "/etc/passwd", "\n\n", "NaN", "null"]
TEXT = st.one_of(
    st.text(max_size=16),
    st.text(alphabet=st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=8),
    st.sampled_from(WEIRD),
)
KEYS = st.one_of(st.sampled_from(["prompt", "messages", "model", "n", "role", "content", "type", "text"]),
                 st.text(max_size=6))
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=8,
)


VALID: dict[str, st.SearchStrategy] = {}  # per field, only values the server must accept


def field(name: str, valid: st.SearchStrategy, *edges) -> st.SearchStrategy:
    """Mostly valid values, then edge values, then anything at all."""
    VALID[name] = valid
    return st.one_of(valid, valid, st.sampled_from(list(edges)) if edges else valid, JUNK)


SMALL_INT_EDGES = (0, -1, 2**31, 2**63, 2**64, 10**40, None, 1.5, "3", True, NAN)
FLOAT_EDGES = (-1.0, 0.0, NAN, INF, -INF, 1e308, -1e308, None, "0.5", True, 10**40)
TOKEN_IDS = st.lists(st.integers(min_value=-3, max_value=600), max_size=6)
STOPS = [" ", "🙂", "\n\n", "<|endoftext|>", "<|user|>", "{{ 7*7 }}", "NaN", "null"]
PLAIN_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=5)  # <= 20 tokens: fits the context
SAMPLING = {
    "model": field("model", st.sampled_from([MODEL, f"{MODEL}:base", f"{MODEL}:expert"]), None, "", "gpt-4o",
                   "/etc/passwd", f"{MODEL}:anti_expert"),
    "stream": field("stream", st.booleans(), None, "true", 1),
    "stream_options": field("stream_options", st.fixed_dictionaries({"include_usage": st.booleans()}), None, {},
                            "x"),
    "n": field("n", st.integers(min_value=1, max_value=3), *SMALL_INT_EDGES, 16, 17),
    "max_tokens": field("max_tokens", st.integers(min_value=1, max_value=6), *SMALL_INT_EDGES),
    "max_completion_tokens": field("max_completion_tokens", st.integers(min_value=1, max_value=6),
                                   *SMALL_INT_EDGES),
    "temperature": field("temperature", st.floats(min_value=0, max_value=2), *FLOAT_EDGES, 1e-39, 5e-324, 1e-5,
                         1e4, 1.0001e4),
    "top_p": field("top_p", st.floats(min_value=0.05, max_value=1), *FLOAT_EDGES),
    "top_k": field("top_k", st.integers(min_value=-1, max_value=600), *SMALL_INT_EDGES),
    "min_p": field("min_p", st.floats(min_value=0, max_value=1), *FLOAT_EDGES),
    "presence_penalty": field("presence_penalty", st.floats(min_value=-2, max_value=2), *FLOAT_EDGES),
    "frequency_penalty": field("frequency_penalty", st.floats(min_value=-2, max_value=2), *FLOAT_EDGES),
    "repetition_penalty": field("repetition_penalty", st.floats(min_value=0.5, max_value=2), *FLOAT_EDGES, 1e-300,
                                1e300, 0.01, 100, 0.0099),
    "stop": field("stop", st.one_of(PLAIN_TEXT, st.lists(PLAIN_TEXT, max_size=4), st.sampled_from(STOPS)),
                  [], ["s"] * 17, ["s" * 300], None, "\ud800"),
    "seed": field("seed", st.integers(min_value=-(2**63), max_value=2**63 - 1), *SMALL_INT_EDGES),
    "logit_bias": field("logit_bias", st.dictionaries(st.integers(min_value=0, max_value=511).map(str),
                                                      st.floats(min_value=-100, max_value=100), max_size=3),
                        {"512": 1}, {"-1": 1}, {"x": 1}, {"1": NAN}, {"1": 1e9}, {}, None,
                        {str(i): 1 for i in range(301)}),
    "alpha": field("alpha", st.one_of(st.floats(min_value=-3, max_value=3), st.lists(st.floats(-3, 3), min_size=1,
                                                                                      max_size=1)),
                   *FLOAT_EDGES, [], [1, 2], [NAN]),
    "stop_token_ids": field("stop_token_ids", st.lists(st.integers(min_value=0, max_value=511), max_size=3), None,
                            [], [10**40], [-1], [512], [1] * 257),
    "ignore_eos": field("ignore_eos", st.booleans(), None, "no"),
    "min_tokens": field("min_tokens", st.integers(min_value=0, max_value=1), *SMALL_INT_EDGES),
    "skip_special_tokens": field("skip_special_tokens", st.booleans(), None),
    "include_stop_str_in_output": field("include_stop_str_in_output", st.booleans(), None),
    "user": field("user", PLAIN_TEXT, None),
    "unknown_sampler_field": JUNK,
}
# Fields other parts of the API add (structured output, tools): shape-level fuzzing only, expecting a 200 or a
# 4xx whatever the server does with them (not in VALID: a server may refuse what it does not support).
SCHEMA = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "integer", "array"])},
                                         optional={"properties": st.dictionaries(TEXT, JUNK, max_size=2),
                                                   "required": st.lists(TEXT, max_size=2)}), JUNK)
FUNCTION = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["get_weather", "a" * 65, ""]), TEXT)},
                                 optional={"description": TEXT, "parameters": SCHEMA, "strict": st.booleans()})
NEWER = {
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "grammar", "x"])},
                              optional={"json_schema": st.fixed_dictionaries(
                                  {"name": TEXT}, optional={"schema": SCHEMA, "strict": st.booleans()})}),
        JUNK),
    "tools": st.one_of(st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("function"), "function": FUNCTION}),
                                          JUNK), max_size=3), JUNK),
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required", "any"]),
                             st.fixed_dictionaries({"type": st.just("function"),
                                                    "function": st.fixed_dictionaries({"name": TEXT})}), JUNK),
    "parallel_tool_calls": st.one_of(st.booleans(), JUNK),
    "guided_json": st.one_of(SCHEMA, JUNK),
    "guided_regex": st.one_of(st.sampled_from(["[a-z]+", "(", "a{1000000}"]), JUNK),
    "guided_choice": st.one_of(st.lists(TEXT, max_size=3), JUNK),
}
COMPLETION_FIELDS = {
    **SAMPLING,
    "prompt": field("prompt", st.one_of(PLAIN_TEXT, st.lists(PLAIN_TEXT, min_size=1, max_size=1),
                                        st.lists(st.integers(min_value=0, max_value=511), min_size=1, max_size=6)),
                    "", [], [[]], ["a", "b"], list(range(40)), None, "\ud800", [-1], [[1], [2]]),
    "logprobs": field("logprobs", st.integers(min_value=0, max_value=3), *SMALL_INT_EDGES, 20, 21),
    "echo": field("echo", st.booleans(), None),
    "suffix": field("suffix", st.none(), "", "x"),
    **{k: NEWER[k] for k in ("response_format", "guided_json", "guided_regex", "guided_choice")},
}
COMPLETION_BODY = st.fixed_dictionaries({}, optional=COMPLETION_FIELDS)
VALID_COMPLETION = st.fixed_dictionaries(
    {"prompt": VALID["prompt"]},
    optional={k: VALID[k] for k in COMPLETION_FIELDS if k in VALID and k not in ("prompt", "echo")},
).filter(lambda b: not (b.get("min_tokens") and b.get("max_tokens", 16) < b["min_tokens"]))
ROLE = st.one_of(st.sampled_from(["system", "developer", "user", "assistant"]),
                 st.sampled_from(["tool", "function", "wizard", "", "USER"]), TEXT)
CONTENT = st.one_of(
    TEXT, st.none(),
    st.lists(st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text"]), "text": TEXT}),
                       st.fixed_dictionaries({"type": st.sampled_from(["image_url", "audio"])}), JUNK), max_size=3),
)
TOOL_CALL = st.fixed_dictionaries({"id": TEXT, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": TEXT, "arguments": st.one_of(st.just('{"city": "Paris"}'), TEXT)})})
MESSAGE = st.one_of(st.fixed_dictionaries({"role": ROLE, "content": CONTENT},
                                          optional={"tool_calls": st.one_of(st.lists(TOOL_CALL, max_size=2), JUNK),
                                                    "tool_call_id": st.one_of(TEXT, JUNK), "name": TEXT}), JUNK)
VALID_MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant"]),
    "content": st.one_of(PLAIN_TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": PLAIN_TEXT}),
                                              min_size=1, max_size=2)),
})
CHAT_FIELDS = {
    **SAMPLING,
    "messages": field("messages", st.lists(VALID_MESSAGE, min_size=1, max_size=2), [], None, "hi",
                      [{"role": "user", "content": "\ud800"}]),
    "logprobs": field("logprobs", st.booleans(), None, 1),
    "chat_template": st.one_of(st.none(), TEXT),
    **NEWER,
}
CHAT_BODY = st.fixed_dictionaries({}, optional={**CHAT_FIELDS, "messages": st.one_of(CHAT_FIELDS["messages"],
                                                                                   st.lists(MESSAGE, max_size=3)),
                                                "top_logprobs": field("top_logprobs", st.integers(0, 3),
                                                                      *SMALL_INT_EDGES, 20, 21)})
VALID_CHAT = st.fixed_dictionaries(
    {"messages": VALID["messages"]},
    optional={k: VALID[k] for k in CHAT_FIELDS if k in VALID and k != "messages"},
).filter(lambda b: not (b.get("min_tokens") and b.get("max_tokens", 16) < b["min_tokens"]))


@FUZZ
@given(body=st.one_of(COMPLETION_BODY, JUNK))
def test_fuzz_completions(http, body):
    send(http, COMPLETIONS, body)


@FUZZ
@given(body=st.one_of(CHAT_BODY, JUNK))
def test_fuzz_chat(http, body):
    send(http, CHAT, body)


def served(response: httpx.Response) -> bool:
    """200, or the one refusal valid values may still get here: a prompt past this small context."""
    if response.status_code == 400:
        return "maximum context length" in response.json()["error"]["message"]
    return response.status_code == 200


@FUZZ
@given(body=VALID_COMPLETION)
def test_fuzz_valid_completions_are_served(http, body):
    """Any combination of valid values is served, whatever it does to the sampler."""
    assert served(send(http, COMPLETIONS, body))


@FUZZ
@given(body=VALID_CHAT)
def test_fuzz_valid_chat_is_served(http, body):
    assert served(send(http, CHAT, body))


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda a, b: b'{"prompt": "' + a + b'", "max_tokens": 1' + b, st.binary(max_size=16),
              st.sampled_from([b"}", b"", b",}", b'}{"x": 1}'])),
), path=st.sampled_from([COMPLETIONS, CHAT, "/tokenize", "/detokenize"]))
def test_fuzz_raw_bytes(http, raw, path):
    send(http, path, raw=raw)


TGI_PARAMETERS = {
    "max_new_tokens": field("tgi_max_new_tokens", st.integers(min_value=1, max_value=6), *SMALL_INT_EDGES),
    "do_sample": field("do_sample", st.booleans(), None, "yes"),
    "temperature": field("tgi_temperature", st.floats(min_value=0.05, max_value=2), *FLOAT_EDGES),
    "top_p": field("tgi_top_p", st.floats(min_value=0.05, max_value=1), *FLOAT_EDGES),
    "top_k": field("tgi_top_k", st.integers(min_value=1, max_value=600), *SMALL_INT_EDGES),
    "typical_p": field("typical_p", st.floats(min_value=0.05, max_value=1), *FLOAT_EDGES),
    "repetition_penalty": field("tgi_repetition_penalty", st.floats(min_value=0.5, max_value=2), *FLOAT_EDGES),
    "frequency_penalty": field("tgi_frequency_penalty", st.floats(min_value=-2, max_value=2), *FLOAT_EDGES),
    "seed": field("tgi_seed", st.integers(min_value=0, max_value=2**64 - 1), *SMALL_INT_EDGES),
    "stop": field("tgi_stop", st.lists(PLAIN_TEXT, max_size=4), "x", ["s"] * 17, None, ["\ud800"]),
    "truncate": field("truncate", st.integers(min_value=1, max_value=20), *SMALL_INT_EDGES),
    "return_full_text": field("return_full_text", st.booleans(), None),
    "details": field("details", st.booleans(), None),
    "top_n_tokens": field("top_n_tokens", st.integers(min_value=0, max_value=3), *SMALL_INT_EDGES),
    "alpha": SAMPLING["alpha"],
    "adapter_id": field("adapter_id", st.sampled_from([MODEL, f"{MODEL}:base", f"{MODEL}:expert"]), "", "lora"),
    "decoder_input_details": st.one_of(st.booleans(), JUNK),
    "best_of": st.one_of(st.sampled_from([None, 0, 1, 2]), JUNK),
    "watermark": st.one_of(st.booleans(), JUNK),
    "grammar": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["json", "regex", "json_schema", "x"]),
                                                "value": st.one_of(SCHEMA, st.sampled_from(["[a-z]+", "("]))}),
                         JUNK),
}
TGI_BODY = st.fixed_dictionaries({}, optional={
    "inputs": st.one_of(PLAIN_TEXT, TEXT, JUNK), "parameters": st.one_of(
        st.fixed_dictionaries({}, optional=TGI_PARAMETERS), JUNK), "stream": st.one_of(st.booleans(), JUNK)})
VALID_TGI = st.fixed_dictionaries({"inputs": PLAIN_TEXT, "parameters": st.fixed_dictionaries({}, optional={
    name: VALID[f"tgi_{name}" if f"tgi_{name}" in VALID else name] for name in TGI_PARAMETERS
    if (f"tgi_{name}" in VALID or name in VALID)})}, optional={"stream": st.booleans()})


@FUZZ
@given(body=st.one_of(TGI_BODY, JUNK), path=st.sampled_from(TGI_PATHS))
def test_fuzz_tgi(http, body, path):
    send(http, path, body)


@FUZZ
@given(body=VALID_TGI, path=st.sampled_from(TGI_PATHS))
def test_fuzz_valid_tgi_is_served(http, body, path):
    """Any combination of TGI's valid values is served (or meets this small context)."""
    response = send(http, path, body)
    assert response.status_code == 200 or "maximum context length" in response.json()["error"], response.text


def _operations(app) -> list[tuple[str, str]]:
    """Every (method, path) of the app's OpenAPI schema."""
    return [(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item]


def test_schema_lists_what_is_fuzzed(server):
    """A new endpoint is fuzzed too: the generic fuzzer below walks the schema's operations."""
    operations = _operations(server.app)
    assert ("POST", COMPLETIONS) in operations and ("POST", CHAT) in operations
    assert {("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models/{model_id}")} <= set(operations)


@FUZZ
@given(data=st.data())
def test_fuzz_every_schema_operation(server, http, data):
    method, path = data.draw(st.sampled_from(_operations(server.app)))
    if "{" in path:
        value = data.draw(TEXT)
        head, _, tail = path.partition("{")
        path = head + quote(value.encode("utf-8", "surrogatepass"), safe="") + tail.partition("}")[2]
    if method == "GET":
        response = http.get(path)
        SENT[(path if "/v1/models/" not in path else "/v1/models/{id}", response.status_code)] += 1
        assert response.status_code in {200, 404}, (path, response.text)
        if response.status_code == 404:
            error_of(response)
        return
    body = data.draw(st.one_of(JUNK, st.fixed_dictionaries({}, optional={
        "prompt": st.one_of(TEXT, TOKEN_IDS), "messages": st.lists(MESSAGE, max_size=2), "tokens": TOKEN_IDS,
        "model": SAMPLING["model"]})))
    send(http, path, body, method=method)  # POST, or DELETE (a stored response)
