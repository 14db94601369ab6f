"""``proxy-serve run-batch``: OpenAI's batch file format, offline, answered as the same requests over HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys

import httpx
import pytest

from server.batch import OrderedWriter, _send, parse_line, run_batch
from tests.server.live import MODEL, make_settings

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": True}
COMPLETION = {"model": f"{MODEL}:base", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
              "ignore_eos": True}


def line(custom_id: str, url: str, body: dict, method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


@pytest.mark.parametrize(("text", "custom_id", "why"), [
    ("{", None, "not JSON"),
    ("[1]", None, "JSON object"),
    ('{"method": "POST"}', None, "custom_id"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {}}', "a", "method: required"),
    (line("a", "/v1/completions", {}, "GET"), "a", "only POST"),
    (line("a", "/v1/embeddings", {}), "a", "not served in a batch"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": [1]}), "a", "JSON object"),
    (line("a", "/v1/completions", {"prompt": "x", "stream": True}), "a", "must not be streamed"),
])
def test_a_line_that_is_not_a_request_says_why(text, custom_id, why):
    got_id, request = parse_line(text)
    assert got_id == custom_id and isinstance(request, str) and why in request


def test_a_request_line():
    assert parse_line(line("x", "/v1/chat/completions", CHAT)) == ("x", {"url": "/v1/chat/completions", "body": CHAT})


def test_outputs_are_written_in_input_order_as_soon_as_they_can_be():
    sink = io.StringIO()
    writer = OrderedWriter(sink)
    writer.put(1, {"n": 1})
    assert sink.getvalue() == ""  # held until the first is written
    writer.put(0, {"n": 0})
    writer.put(3, {"n": 3})
    assert [json.loads(x)["n"] for x in sink.getvalue().splitlines()] == [0, 1]
    writer.put(2, {"n": 2})
    assert [json.loads(x)["n"] for x in sink.getvalue().splitlines()] == [0, 1, 2, 3] and not writer.held


async def test_a_request_the_queue_turns_away_is_sent_again():
    answers = iter([429, 429, 200])
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(next(answers), json={})

    class Ready:
        ready = True

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://localhost") as client:
        response = await _send(client, Ready(), {"url": "/v1/completions", "body": {"prompt": "x"}})
    assert response.status_code == 200 and sent == [{"prompt": "x"}] * 3


def test_a_line_that_fails_in_the_runner_is_an_error_line_and_the_batch_goes_on(monkeypatch):
    """Not the server's answer but the runner's own failure (a transport error, say): that line says so."""
    import server.batch as batch
    from server.app import create_app
    from server.settings import load_settings
    from tests.server.fake_engine import FakeEngine

    real = batch._send

    async def flaky(client, ctx, request):
        if request["body"]["prompt"] == "boom":
            raise httpx.ReadError("the connection broke")
        return await real(client, ctx, request)

    monkeypatch.setattr(batch, "_send", flaky)
    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    app = create_app(FakeEngine(), load_settings(overrides={"engine": engine}, environ=False))
    lines = [line(name, "/v1/completions", {"model": MODEL, "prompt": name, "max_tokens": 2})
             for name in ("one", "boom", "two")]
    sink = io.StringIO()
    summary = asyncio.run(run_batch(app, iter(lines), sink))
    out = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert [o["custom_id"] for o in out] == ["one", "boom", "two"] and summary.failed == 1
    assert out[0]["response"]["status_code"] == 200 and out[2]["response"]["status_code"] == 200
    assert out[1]["response"] is None and out[1]["error"] == {"code": "internal_error",
                                                             "message": "ReadError: the connection broke"}


def test_every_line_is_answered_in_order_as_over_http(tiny_family, http):
    """In process, through the same app as the live server: greedy answers are the HTTP ones, character for
    character; refusals keep their status and error body; lines that are not requests say why."""
    from proxy_engine.engine_process import async_engine_for
    from server.app import create_app

    lines = [line("chat", "/v1/chat/completions", CHAT), line("text", "/v1/completions", COMPLETION),
             line("missing", "/v1/completions", {**COMPLETION, "model": "nope"}), "not json", "",
             line("text", "/v1/completions", COMPLETION),
             line("resp", "/v1/responses", {"model": MODEL, "input": "Hello", "max_output_tokens": 4})]
    settings = make_settings(tiny_family, api_keys=["sk-batch"])  # the runner sends the key itself
    app = create_app(async_engine_for(settings.engine), settings)
    sink = io.StringIO()
    summary = asyncio.run(run_batch(app, iter(lines), sink))
    out = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert [o["custom_id"] for o in out] == ["chat", "text", "missing", None, "text", "resp"]
    assert summary.requests == 6 and summary.failed == 3 and summary.completion_tokens == 6 + 5 + 4
    chat, text, missing, garbled, twice, resp = out
    over_http = http.post("/v1/chat/completions", json=CHAT).json()
    assert chat["response"]["status_code"] == 200 and chat["error"] is None
    assert chat["response"]["body"]["choices"][0]["message"] == over_http["choices"][0]["message"]
    assert chat["response"]["request_id"] == chat["response"]["body"]["id"]
    assert text["response"]["body"]["choices"][0]["text"] == \
        http.post("/v1/completions", json=COMPLETION).json()["choices"][0]["text"]
    assert missing["response"]["status_code"] == 404
    assert missing["response"]["body"]["error"]["code"] == "model_not_found"
    assert missing["error"]["code"] == "model_not_found" and "nope" in missing["error"]["message"]
    assert garbled["response"] is None and "not JSON" in garbled["error"]["message"]
    assert twice["response"] is None and "unique" in twice["error"]["message"]
    assert resp["response"]["body"]["object"] == "response"
    assert resp["response"]["body"]["status"] == "incomplete"  # cut by max_output_tokens
    assert len({o["id"] for o in out}) == len(out)


def test_the_command_line_runs_a_file_past_a_full_queue(tiny_family, tmp_path):
    """``proxy-serve run-batch``, vLLM's flags for the files: twice as many requests in flight as the batch holds and
    no queue at all, so most are turned away at first; every one is answered all the same, in order."""
    requests = [line(f"r{k}", "/v1/completions", {**COMPLETION, "prompt": f"Story number {k}"}) for k in range(12)]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(requests) + "\n")
    out = tmp_path / "out" / "answers.jsonl"
    args = ["run-batch", "-i", str(batch), "-o", str(out), "--base", str(tiny_family.base), "--expert",
            str(tiny_family.expert), "--anti-expert", str(tiny_family.anti_expert), "--max-num-seqs", "2"]
    done = subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "PROXY_SERVE_ENGINE__LIMITS__MAX_WAITING": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["custom_id"] for a in answers] == [f"r{k}" for k in range(12)]
    assert all(a["response"]["status_code"] == 200 and a["error"] is None for a in answers)
    assert all(a["response"]["body"]["usage"]["completion_tokens"] == 5 for a in answers)
    assert "batch done: 12 requests, 0 failed" in done.stderr
    assert "status=429" in done.stderr  # the queue did turn requests away: they were sent again
    missing = subprocess.run([sys.executable, "-m", "server", "run-batch", "-o", str(out)], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "--input-file" in missing.stderr
