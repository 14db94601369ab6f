"""SIGTERM: stop admitting (503, ``/health`` says draining), let running streams finish within the grace period
(``--shutdown-grace``), end what is left with a ``shutdown`` error, and exit 0.

The server is a real ``proxy-serve`` subprocess whose engine can be held still (``gated_server.py``), so
that a request is in flight for exactly as long as a test needs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from bench.harness import free_port
from tests.reliability.support import (
    SUBPROCESS_ENV,
    choice_tokens,
    error_of,
    finish_reasons,
    iter_events,
    stream_error,
)
from tests.server.live import MODEL, wait_until

HERE = Path(__file__).resolve().parent


class Subprocess:
    def __init__(self, family, tmp_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gate = tmp_path / "gate"
        self.gate.touch()
        self.log = tmp_path / "server.log"
        with open(self.log, "w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "gated_server.py"), "--base", str(family.base), "--expert",
                 str(family.expert), "--anti-expert", str(family.anti_expert), "--port", str(self.port), *args],
                stdout=sink, stderr=subprocess.STDOUT,
                env={**os.environ, **SUBPROCESS_ENV, "PROXY_TEST_GATE": str(self.gate)},
            )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return self.process.poll() is not None

    def health(self) -> tuple[int, dict]:
        response = httpx.get(f"{self.url}/health", timeout=5)
        return response.status_code, response.json()

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def close(self) -> None:
        self.gate.unlink(missing_ok=True)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture()
def launch(tiny_family, tmp_path):
    started: list[Subprocess] = []

    def start(*args: str) -> Subprocess:
        server = Subprocess(tiny_family, tmp_path, *args)
        started.append(server)
        assert wait_until(server.healthy, timeout=120, interval=0.1) and server.process.poll() is None, \
            server.log.read_text()
        return server

    yield start
    for server in started:
        server.close()


class Streamer(threading.Thread):
    """One streamed request in a thread; ``first`` is set once its first event arrived."""

    def __init__(self, url: str, path: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.first = threading.Event()
        self.events: list = []
        self.status: int | None = None

    def run(self) -> None:
        with httpx.stream("POST", f"{self.url}{self.path}", json={**self.body, "stream": True}, timeout=120) as r:
            self.status = r.status_code
            for event in iter_events(r.iter_lines()):
                self.events.append(event)
                self.first.set()
        self.first.set()


def test_sigterm_drains_running_streams_then_exits_zero(launch):
    server = launch("--shutdown-grace", "60")
    body = {"model": MODEL, "prompt": "Drain", "max_tokens": 30, "ignore_eos": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    streamer = Streamer(server.url, "/v1/completions", body)
    streamer.start()
    assert streamer.first.wait(60) and streamer.status == 200  # in flight; the engine holds it at token 1

    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: server.health() == (503, {"status": "draining"}), timeout=30)
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "late"}, timeout=30)
    assert error_of(refused, 503)["code"] == "draining" and int(refused.headers["retry-after"]) >= 1
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "late"}]})
    assert error_of(chat, 503)["code"] == "draining"
    assert server.process.poll() is None  # still serving the running stream

    server.gate.unlink()  # let the engine go: the stream finishes in full, then the process exits
    streamer.join(60)
    assert server.wait() == 0, server.log.read_text()
    events = streamer.events
    assert events[-1] == "[DONE]" and stream_error(events) is None
    assert choice_tokens(events) == {0: 30} and finish_reasons(events) == {0: ["length"]}
    assert events[-2]["usage"]["completion_tokens"] == 30
    log = server.log.read_text()
    assert "SIGTERM: draining" in log and "drained" in log and "Traceback" not in log
    assert "leaked" not in log


def test_sigterm_drain_with_the_engine_process_leaves_no_semaphore(tiny_family, tmp_path):
    """The real ``proxy-serve`` (engine core in its own process, the default): after a request and a SIGTERM drain
    it exits 0 and Python's resource tracker finds nothing leaked (tqdm's multiprocessing lock, created while
    the child loaded the models, used to be one "leaked semaphore" on every shutdown)."""
    port = free_port()
    env = {**os.environ, **SUBPROCESS_ENV}
    env.pop("PROXY_SERVE_ENGINE_PROCESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--base", str(tiny_family.base), "--expert", str(tiny_family.expert),
         "--anti-expert", str(tiny_family.anti_expert), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None

        assert wait_until(healthy, timeout=120, interval=0.2) and process.poll() is None
        answer = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-3000:]
    assert "engine process" in stderr and "drained" in stderr  # it ran in its own process, and drained
    assert "leaked semaphore" not in stderr and "resource_tracker" not in stderr, stderr[-3000:]


def test_grace_period_over_ends_open_requests_with_a_shutdown_error(launch):
    server = launch("--shutdown-grace", "1")
    streamed = Streamer(server.url, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 30, "ignore_eos": True})
    streamed.start()
    assert streamed.first.wait(60)
    plain: dict = {}
    waiter = threading.Thread(target=lambda: plain.update(response=httpx.post(
        f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 30}, timeout=120)))
    waiter.start()
    # The plain request waits behind the held step (it is queued, not yet prefilled).
    assert wait_until(lambda: "proxy_serve_num_requests_waiting 1.0" in httpx.get(f"{server.url}/metrics").text,
                      timeout=30)

    server.process.send_signal(signal.SIGTERM)  # the engine is held: nothing can finish within 1 s
    streamed.join(60)
    waiter.join(60)
    server.gate.unlink()
    assert server.wait() == 0, server.log.read_text()
    error = stream_error(streamed.events)
    assert error is not None and error["code"] == "shutdown" and error["type"] == "service_unavailable"
    assert "retry" in error["message"]
    assert error_of(plain["response"], 503)["code"] == "shutdown"
    log = server.log.read_text()
    assert "grace period over: ending 2 open request(s)" in log and "Traceback" not in log


def test_a_second_signal_ends_the_grace_period_at_once():
    from server.process import DrainingServer

    class Ctx:
        in_flight = 3
        drained = expired = 0

        def drain(self) -> None:
            self.drained += 1

    import uvicorn

    ctx = Ctx()
    server = DrainingServer(uvicorn.Config(app=None), ctx, grace_s=3600)
    server.handle_exit(signal.SIGTERM, None)
    first = server.drain_deadline
    assert ctx.drained == 1 and first is not None and not server.should_exit
    server.handle_exit(signal.SIGINT, None)
    assert server.drain_deadline < first and not server._captured_signals  # no re-raise at exit: status 0


def test_sigterm_while_the_models_load_exits_at_once(tiny_family, tmp_path):
    """A rollout that stops a server still loading a large model must not wait for the load to finish."""
    gate = tmp_path / "loading"
    gate.touch()
    port = free_port()
    log = tmp_path / "loading.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "gated_server.py"), "--base", str(tiny_family.base), "--expert",
             str(tiny_family.expert), "--anti-expert", str(tiny_family.anti_expert), "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, **SUBPROCESS_ENV, "PROXY_TEST_GATE": str(tmp_path / "gate"),
                 "PROXY_TEST_LOAD_GATE": str(gate)},
        )
    try:
        def loading() -> bool:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except httpx.HTTPError:
                return False
            return response.status_code == 503 and "loading" in response.text

        assert wait_until(loading, timeout=60, interval=0.1), log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log.read_text()  # the gate would hold the load for 120 s
        assert "stopped while the models were loading" in log.read_text()
    finally:
        gate.unlink(missing_ok=True)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
