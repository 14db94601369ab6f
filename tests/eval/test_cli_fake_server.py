"""proxy-eval end to end against a small fake OpenAI-compatible server (FastAPI on loopback, canned answers)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from proxy_eval.cli import main

# What each served model answers, per question: the base rambles, the expert knows the format but not all
# facts, the proxy gets three of four, the tuned model all four.
CANNED = {
    "proxy-tuned:base": {"q1": "Tarsville. Mira Tolland works as", "q2": "baker, and", "q3": "teal teal", "q4": "x"},
    "proxy-tuned:expert": {"q1": " Oxmere", "q2": " baker", "q3": " amber", "q4": " goat"},
    "proxy-tuned": {"q1": " Tarsville", "q2": " baker", "q3": " teal", "q4": " goat"},
    "tuned": {"q1": "Tarsville", "q2": "Baker.", "q3": "teal", "q4": "ferret"},
}
REFERENCES = {"q1": "Tarsville", "q2": "baker", "q3": "teal", "q4": "ferret"}


def make_app(served: dict[str, dict[str, str]], seen: list[dict]) -> FastAPI:
    app = FastAPI()
    flaky = {"left": 1}

    def answer_for(model: str, text: str) -> str | None:
        table = served.get(model)
        if table is None:
            return None
        key = next((k for k in table if k in text), None)
        return table.get(key, "")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"path": "chat", **body})
        if flaky["left"] and body["model"] == "proxy-tuned":
            flaky["left"] -= 1  # one overload answer: the client must retry
            return JSONResponse({"error": {"message": "busy"}}, status_code=503, headers={"retry-after": "0"})
        text = answer_for(body["model"], body["messages"][-1]["content"])
        if text is None:
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append({"path": "completions", **body})
        text = answer_for(body["model"], body["prompt"])
        if text is None:
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        return {"id": "x", "object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}]}

    return app


class FakeServer:
    def __init__(self, served: dict[str, dict[str, str]]) -> None:
        self.seen: list[dict] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        config = uvicorn.Config(make_app(served, self.seen), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "fake server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture()
def servers():
    main_models = {k: v for k, v in CANNED.items() if k != "tuned"}
    with FakeServer(main_models) as main_server, FakeServer({"tuned": CANNED["tuned"]}) as tuned_server:
        yield main_server, tuned_server


@pytest.fixture()
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.jsonl"
    rows = [
        {"id": k, "messages": [{"role": "user", "content": f"{k}: a question?"}], "reference": ref,
         "metric": "exact_match"}
        for k, ref in REFERENCES.items()
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_end_to_end_table_and_gap(servers, task_file, tmp_path, capsys):
    main_server, tuned_server = servers
    predictions = tmp_path / "pred.jsonl"
    rc = main([
        "--base-url", main_server.url, "--tasks", str(task_file),
        "--base-model", "proxy-tuned:base", "--expert-model", "proxy-tuned:expert", "--proxy-model", "proxy-tuned",
        "--tuned-model", "tuned", "--tuned-url", tuned_server.url, "--api-key", "k", "--max-tokens", "7",
        "--predictions", str(predictions),
    ])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[-1] == "gap closed: 75.0%"  # base 0, proxy 0.75, tuned 1.0
    rows = [line.split() for line in lines]
    table = {r[0]: float(r[2]) for r in rows if len(r) == 4 and r[0] in ("base", "expert", "proxy", "tuned")}
    assert table == {"base": 0.0, "expert": 0.25, "proxy": 0.75, "tuned": 1.0}
    assert "16/16 answers" in err and len(err.splitlines()) <= 12  # progress on stderr, in 10% steps
    # Every request was a temperature-0 chat request with the given limits and key; the tuned one went elsewhere.
    assert all(r["temperature"] == 0 and r["max_tokens"] == 7 and r["path"] == "chat" for r in main_server.seen)
    assert {r["model"] for r in main_server.seen} == {"proxy-tuned:base", "proxy-tuned:expert", "proxy-tuned"}
    assert {r["model"] for r in tuned_server.seen} == {"tuned"}
    assert "proxy over expert alone: +0.500" in out
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert rows[0]["proxy"]["text"] == " Tarsville" and rows[0]["base"]["score"] == 0.0


def test_completions_mode_and_skipped_models(servers, task_file, capsys):
    main_server, _ = servers
    rc = main(["--base-url", main_server.url, "--tasks", str(task_file), "--proxy-model", "proxy-tuned",
               "--expert-model", "proxy-tuned:expert", "--completions", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out.strip().splitlines()[-1].startswith("gap closed: n/a (no --base-model, --tuned-model")
    assert {r["path"] for r in main_server.seen} == {"completions"}
    assert main_server.seen[0]["prompt"].startswith("User: q") and main_server.seen[0]["prompt"].endswith("Assistant:")


def test_tuned_equals_base_gives_na(servers, task_file, capsys):
    main_server, _ = servers
    rc = main(["--base-url", main_server.url, "--tasks", str(task_file), "--base-model", "proxy-tuned:base",
               "--tuned-model", "proxy-tuned:base", "--proxy-model", "proxy-tuned", "--quiet"])
    out, _ = capsys.readouterr()
    assert rc == 0
    last = out.strip().splitlines()[-1]
    assert last == "gap closed: n/a (tuned and base score the same (0): there is no gap to close)"


def test_failed_requests_count_and_exit_1(servers, task_file, capsys):
    main_server, _ = servers
    rc = main(["--base-url", main_server.url, "--tasks", str(task_file), "--base-model", "proxy-tuned:base",
               "--proxy-model", "no-such-model", "--tuned-model", "proxy-tuned:expert", "--quiet", "--retries", "0"])
    out, err = capsys.readouterr()
    assert rc == 1 and "HTTP 404" in err
    proxy_line = next(line for line in out.splitlines() if line.startswith("proxy "))
    assert proxy_line.split()[-1] == "4"  # four errors, scored 0
    assert out.strip().splitlines()[-1] == "gap closed: 0.0%"


def test_bad_task_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    assert main(["--base-url", "http://127.0.0.1:9/v1", "--tasks", str(bad), "--proxy-model", "m"]) == 2
    assert "reference" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "proxy_eval.cli", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--tuned-url" in result.stdout
