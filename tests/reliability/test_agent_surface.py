"""The agents' surface under attack (issue 20): tools, grammars, the Responses store and the prefix cache.

Two servers with two API keys: one with the engine in its own process (the default: requests are pickled to
it), one in-process whose engine methods the tests can watch. Each case here failed before the hardening:

- every field a client sends is counted before any tokenizing or compiling (tool descriptions and parameters,
  earlier calls' arguments, metadata, ``user``, ``cache_salt``; schemas by size and depth), a 400 naming it;
- a grammar that cannot run (llguidance's 2,000-item row limit) is a short 400, not a 500 with a 200 KB dump;
- a grammar compile waits in its own thread: plain requests are admitted while grammar bombs are held;
- stored responses belong to the key that made them; the prefix cache is salted by key and by ``cache_salt``;
- a tool's ``parameters`` must be an object schema; a ``tool`` message must answer an earlier call.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from proxy_engine.engine_process import async_engine_for
from proxy_engine.grammar import MAX_SPEC_DEPTH
from tests.reliability.support import error_of, idle, serve
from tests.server.live import MODEL, LiveServer, make_settings, wait_until

K1, K2 = "sk-tenant-one", "sk-tenant-two"
PROMPT_CHARS = 20_000
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"], "additionalProperties": False}}}
# ~520 optional properties: compiles, then fails on its first token (row of 2,003+ items, max 2,000).
ROW_BOMB = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(520)}}


def deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.fixture(scope="module")
def process_server(tiny_family):
    """The engine in its own process (requests cross a pipe, pickled), two keys."""
    settings = make_settings(tiny_family, api_keys=[K1, K2], max_prompt_chars=PROMPT_CHARS)
    live = LiveServer(async_engine_for(settings.engine), settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def watched(tiny_family):
    """In-process, so that tests can wrap the engine's renderer and grammar compiler."""
    live, _ = serve(tiny_family, api_keys=[K1, K2], max_prompt_chars=PROMPT_CHARS,
                    limits={"grammar_compile_timeout_s": 60})
    yield live
    live.stop()


def client(live: LiveServer, key: str = K1) -> httpx.Client:
    return httpx.Client(base_url=live.url, timeout=120, headers={"Authorization": f"Bearer {key}"})


def chat(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "Hi"}], **body})


class Counted:
    """Wraps ``owner.name``: counts the calls (and, with ``gate``, holds each until the gate opens)."""

    def __init__(self, owner, name: str, gate: threading.Event | None = None) -> None:
        self.owner, self.name, self.gate = owner, name, gate
        self.real = getattr(owner, name)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(60)
        return self.real(*args, **kwargs)

    def __enter__(self) -> Counted:
        setattr(self.owner, self.name, self)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.name, self.real)


# --- every field counted before the work ----------------------------------------------------------------------
def test_tool_text_and_earlier_calls_count_against_the_prompt_limit_before_rendering(watched):
    engine = watched.engine.engine
    big = "x" * (PROMPT_CHARS + 1)
    bomb = {"type": "function", "function": {"name": "f", "description": big,
                                             "parameters": {"type": "object"}}}
    earlier = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": big}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    with client(watched) as http, Counted(engine, "make_sequences") as renders:
        # required: the tools are rendered (under auto this family, which has no tool-call format, leaves them out
        # unrendered: server/tools.py's policy).
        error = error_of(chat(http, tools=[bomb], tool_choice="required"), 400)
        assert error["param"] == "tools" and "max_prompt_chars" in error["message"], error
        error = error_of(chat(http, messages=earlier), 400)
        assert error["param"] == "messages" and "max_prompt_chars" in error["message"], error
        # Template variables are rendered with the messages: they count too (a bomb there is named).
        error = error_of(chat(http, chat_template_kwargs={"notes": big}), 400)
        assert error["param"] == "chat_template_kwargs" and "max_prompt_chars" in error["message"], error
        error = error_of(chat(http, tools=[TOOL] * 129), 400)
        assert "at most 128 tools" in error["message"], error
        assert renders.calls == 0  # refused before anything was rendered or tokenized
        assert chat(http, tools=[TOOL], tool_choice="auto").status_code == 200
    assert idle(watched)


@pytest.mark.parametrize(("path", "body", "param", "needle"), [
    ("/v1/responses", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
    ("/v1/responses", {"metadata": {"k" * 65: "v"}}, "metadata", "at most 64"),
    ("/v1/responses", {"metadata": {"k": "v" * 513}}, "metadata.k", "at most 512"),
    ("/v1/responses", {"metadata": {"k": 1}}, "metadata.k", "string"),
    ("/v1/responses", {"user": "u" * 513}, "user", "at most 512"),
    ("/v1/chat/completions", {"user": "u" * 513}, "user", "at most 512"),
    ("/v1/completions", {"cache_salt": "s" * 257}, "cache_salt", "at most 256"),
    ("/v1/chat/completions", {"cache_salt": ""}, "cache_salt", "at least 1"),
])
def test_metadata_user_and_cache_salt_are_bounded(process_server, path, body, param, needle):
    base = {"/v1/responses": {"input": "Hi", "max_output_tokens": 2},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            "/v1/completions": {"prompt": "Hi", "max_tokens": 2}}[path]
    with client(process_server) as http:
        error = error_of(http.post(path, json={"model": MODEL, **base, **body}), 400)
    assert error["param"].startswith(param) and needle in error["message"], error


def test_metadata_within_openai_limits_is_kept(process_server):
    metadata = {f"k{i:02d}" + "x" * 60: "v" * 512 for i in range(16)}
    with client(process_server) as http:
        response = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 2,
                                                     "metadata": metadata, "user": "u" * 512})
        assert response.status_code == 200, response.text
        assert http.get(f"/v1/responses/{response.json()['id']}").json()["metadata"] == metadata


@pytest.mark.parametrize("where", ["response_format", "guided_json", "guided_json_text", "tools", "responses"])
def test_a_schema_too_deep_for_the_engine_is_a_400(process_server, where):
    """240-470 levels were a 500 with a traceback (RecursionError pickling the request to the engine)."""
    schema = deep_schema(300)
    body: dict = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    path = "/v1/chat/completions"
    if where == "response_format":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    elif where == "guided_json":
        body["guided_json"] = schema
    elif where == "guided_json_text":  # a schema given as a string, past the JSON parser's own recursion limit
        body["guided_json"] = "[" * 100_000 + "]" * 100_000
    elif where == "tools":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    else:
        path, body = "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 4,
                                       "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}
    with client(process_server) as http:
        error = error_of(http.post(path, json=body), 400)
        assert "nested" in error["message"], error
        assert chat(http).status_code == 200  # and the server goes on


def test_a_grammar_that_cannot_run_is_a_short_400(process_server, caplog):
    """It compiled, then failed at the first step: a 500 whose body held llguidance's whole dump (17-240 KB)."""
    with client(process_server) as http:
        response = http.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ROW_BOMB}}})
        error = error_of(response, 400)
        assert "max is 2000" in error["message"] and len(response.content) < 1000, error
        assert chat(http).status_code == 200
    assert all(len(record.getMessage()) < 2000 for record in caplog.records)


def test_schemas_past_the_limits_are_refused_without_compiling(watched):
    compiler = watched.engine.engine.grammars
    too_big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 100}
                                                for i in range(3000)}}
    with client(watched) as http, Counted(compiler, "_compile") as compiles:
        for schema in (deep_schema(MAX_SPEC_DEPTH), too_big):
            error_of(chat(http, guided_json=schema), 400)
        assert compiles.calls == 0


# --- compiling off the admission path -------------------------------------------------------------------------
def test_plain_requests_are_admitted_while_grammar_compiles_are_held(watched):
    """Six grammar bombs hold the compiler (and would hold every render thread if they waited there); a plain
    request and a tool-free chat are served meanwhile; the bombs then finish."""
    compiler = watched.engine.engine.grammars
    gate = threading.Event()
    schemas = [{"type": "object", "properties": {f"q{i}": {"type": "integer"}}} for i in range(6)]
    with Counted(compiler, "_compile", gate) as compiles, ThreadPoolExecutor(6) as pool, client(watched) as http:
        bombs = [pool.submit(chat, http, guided_json=schema) for schema in schemas]
        assert wait_until(lambda: compiles.calls == 1)  # one compile thread: the others queue behind it
        plain = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
        assert plain.status_code == 200 and chat(http).status_code == 200
        assert not any(bomb.done() for bomb in bombs)  # still held while the plain ones were served
        gate.set()
        assert [bomb.result(60).status_code for bomb in bombs] == [200] * 6
    assert idle(watched)


def test_grammar_bombs_in_the_engine_process_do_not_hold_plain_requests(process_server):
    """The same through the engine process, with real bombs (distinct ~1,500-property schemas, each seconds of
    compiling in one compiler thread): a plain request is answered while they are still in flight, and each
    bomb ends in a 400 (cannot run, or not compiled within the budget) or a 429 (never started)."""
    bombs = [{"type": "object", "properties": {f"b{k}_{i}": {"type": "integer"} for i in range(1500)}}
             for k in range(4)]
    with ThreadPoolExecutor(4) as pool, client(process_server) as http:
        futures = [pool.submit(chat, http, guided_json=bomb) for bomb in bombs]
        plain = chat(http)
        pending = sum(not future.done() for future in futures)
        statuses = sorted(future.result(120).status_code for future in futures)
    assert plain.status_code == 200 and pending >= 1, statuses
    assert set(statuses) <= {400, 429}, statuses


# --- tenancy --------------------------------------------------------------------------------------------------
def test_a_stored_response_is_only_visible_to_its_key(process_server):
    with client(process_server, K1) as one, client(process_server, K2) as two:
        made = one.post("/v1/responses", json={"model": MODEL, "input": "my secret", "max_output_tokens": 2})
        assert made.status_code == 200, made.text
        rid = made.json()["id"]
        error_of(two.get(f"/v1/responses/{rid}"), 404)
        error = error_of(two.post("/v1/responses", json={"model": MODEL, "input": "go on", "max_output_tokens": 2,
                                                         "previous_response_id": rid}), 404)
        assert error["param"] == "previous_response_id"
        error_of(two.delete(f"/v1/responses/{rid}"), 404)
        assert one.get(f"/v1/responses/{rid}").status_code == 200
        assert one.post("/v1/responses", json={"model": MODEL, "input": "go on", "max_output_tokens": 2,
                                               "previous_response_id": rid}).status_code == 200
        assert one.delete(f"/v1/responses/{rid}").status_code == 200


def test_the_prefix_cache_is_salted_by_key_and_by_cache_salt(watched):
    prompt = "The tenant's private system prompt, long enough to fill a few blocks of the prefix cache. " * 3

    def hits() -> int:
        return sum(cache.hits_total for cache in watched.engine.stats().prefix_caches)

    def ask(key: str, **extra) -> int:
        before = hits()
        with client(watched, key) as http:
            response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                                          **extra})
        assert response.status_code == 200, response.text
        return hits() - before

    assert ask(K1) == 0  # cold
    assert ask(K2) == 0  # another key: no hit (it was 7,680 hit tokens before, readable on /metrics)
    assert ask(K1, cache_salt="other") == 0  # the same key with another salt: apart too
    assert ask(K1) > 0 and ask(K1, cache_salt="other") > 0  # each chain is reused by its own salt


# --- tool validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parameters", [{"type": "string"}, {"type": ["object", "null"]}, ["not", "a", "schema"]])
def test_tool_parameters_must_be_an_object_schema(process_server, parameters):
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    with client(process_server) as http:
        error = error_of(chat(http, tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}}), 400)
    assert error["param"] == "tools[0].function.parameters", error


def test_a_tool_message_must_answer_an_earlier_call(process_server):
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_2", "content": "21C"}]
    with client(process_server) as http:
        error = error_of(chat(http, messages=messages, tools=[TOOL]), 400)
        assert error["param"] == "messages[2].tool_call_id", error
        messages[2]["tool_call_id"] = "call_1"
        assert chat(http, messages=messages, tools=[TOOL]).status_code == 200
        error = error_of(http.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 2, "input": [
            {"type": "function_call_output", "call_id": "call_9", "output": "21C"}]}), 400)
        assert "answers no tool call" in error["message"], error


# --- keys from a file -----------------------------------------------------------------------------------------
def test_api_keys_can_come_from_a_file(tiny_family, tmp_path, capsys):
    from server.cli import main

    keys = tmp_path / "keys"
    keys.write_text("# mounted from a secret\nsk-from-file\n")
    settings = make_settings(tiny_family, api_keys_file=str(keys))
    assert settings.has_keys and settings.api_key_values() == ["sk-from-file"]
    assert "sk-from-file" not in repr(settings)  # only the path is in the settings
    (tmp_path / "empty").write_text("\n# nothing\n")
    for bad, needle in ((tmp_path / "missing", "cannot read"), (tmp_path / "empty", "holds no key")):
        assert main(["--api-keys-file", str(bad), "--check"]) == 2
        assert needle in capsys.readouterr().err
