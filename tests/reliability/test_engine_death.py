"""The engine's step thread dies outside its guarded phases (admission, the inbox): the process must not hang.

``/health`` answers 503 "failed", every open stream ends with an error event and ``[DONE]``, a waiting
non-streamed request gets a 500, new requests get 503 ``engine_failed``, and the process exits non-zero so
that an orchestrator restarts it. The fault is injected in a real ``proxy-serve`` subprocess
(``gated_server.py``, ``$PROXY_TEST_DIE``).
"""

from __future__ import annotations

import threading

import httpx

from server.metrics import PREFIX
from tests.reliability.support import error_of, stream_error
from tests.reliability.test_shutdown import Streamer, launch  # noqa: F401 - launch is a fixture
from tests.server.live import MODEL, wait_until

__all__ = ["launch"]


def test_a_dead_step_thread_fails_everything_and_exits_non_zero(launch, tmp_path, monkeypatch):
    die = tmp_path / "die"
    monkeypatch.setenv("PROXY_TEST_DIE", str(die))
    server = launch("--shutdown-grace", "60")
    body = {"model": MODEL, "prompt": "Doomed", "max_tokens": 30, "ignore_eos": True}
    streamer = Streamer(server.url, "/v1/completions", body)
    streamer.start()
    assert streamer.first.wait(60) and streamer.status == 200  # in flight; the engine holds it at token 1
    waiting: list[httpx.Response] = []
    plain = threading.Thread(target=lambda: waiting.append(httpx.post(
        f"{server.url}/v1/chat/completions", timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 30})))
    plain.start()

    def queued() -> bool:  # the chat request waits in the engine's queue behind the held step
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        return any(line.startswith(f"{PREFIX}_num_requests_waiting ") and float(line.split()[-1]) >= 1
                   for line in metrics.splitlines())

    assert wait_until(queued, timeout=60)

    die.touch()
    server.gate.unlink()  # the held step ends; the next one dies
    streamer.join(60)
    plain.join(60)
    status, health = server.health()
    assert (status, health) == (503, {"status": "failed"})
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "late"}, timeout=30)
    assert error_of(refused, 503)["code"] == "engine_failed"

    error = stream_error(streamer.events)
    assert error is not None and error["code"] == "internal_error", streamer.events[-3:]
    assert error_of(waiting[0], 500)["code"] == "internal_error"
    code = server.wait()
    log = server.log.read_text()
    assert code == 1, log
    assert "the engine step loop crashed" in log and "proxy-serve: error: the engine failed" in log
