"""Helpers for the reliability tests: servers with fault hooks, SSE parsing, OpenAI error shape checks."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from proxy_engine.async_engine import AsyncEngine
from tests.server.live import LiveServer, make_settings, wait_until

Rule = Callable[[str, list], None]


class FaultHooks:
    """Installed as ``ProxyEngine.fault_hook``: runs the rules a test switched on, in the engine's step thread
    (phases "decode", "prefill", "sample"; a rule that raises fails that phase's sequences)."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []

    def __call__(self, phase: str, sequences: list) -> None:
        for rule in list(self.rules):
            rule(phase, sequences)

    @contextlib.contextmanager
    def on(self, rule: Rule) -> Iterator[Rule]:
        self.rules.append(rule)
        try:
            yield rule
        finally:
            self.rules.remove(rule)


def raise_for_seed(seed: int, phase: str, error: Callable[[], BaseException], *, after: int = 0) -> Rule:
    """Raise ``error()`` in ``phase`` whenever a sequence of a request sent with this ``seed`` is in it (from
    its ``after + 1``-th time on, so that some tokens get out first)."""
    seen = [0]

    def rule(current: str, sequences: list) -> None:
        if current == phase and any(s.params.seed == seed for s in sequences):
            seen[0] += 1
            if seen[0] > after:
                raise error()

    return rule


class Gate:
    """Holds the engine's step thread in ``phase`` while closed (at most ``limit_s``): the engine stands still,
    deterministically, while a test acts on the server around it."""

    def __init__(self, phase: str = "decode", limit_s: float = 60.0) -> None:
        self.phase = phase
        self.limit_s = limit_s
        self.opened = threading.Event()
        self.holding = threading.Event()

    def __call__(self, phase: str, sequences: list) -> None:
        if phase == self.phase and not self.opened.is_set():
            self.holding.set()
            self.opened.wait(self.limit_s)

    def open(self) -> None:
        self.opened.set()


def one_thread() -> None:
    """The tiny models run fastest on one thread, and on a shared machine several spin against each other
    (30x slower per step here): the in-process servers and the server subprocesses use one."""
    import torch

    torch.set_num_threads(1)


SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                  "TOKENIZERS_PARALLELISM": "false"}


def serve(family, *, limits: dict | None = None, runtime: dict | None = None,
          **server: Any) -> tuple[LiveServer, FaultHooks]:
    """A live server on a free loopback port, with ``FaultHooks`` installed in its engine."""
    one_thread()
    settings = make_settings(family, limits=limits, runtime=runtime, **server)
    live = LiveServer(AsyncEngine(settings.engine), settings).start()
    hooks = FaultHooks()
    live.engine.engine.fault_hook = hooks
    return live, hooks


@contextlib.contextmanager
def served(family, **kwargs: Any) -> Iterator[LiveServer]:
    """``serve`` for a fixture: the server, its ``FaultHooks`` as ``hooks``, stopped at the end."""
    live, hooks = serve(family, **kwargs)
    live.hooks = hooks
    try:
        yield live
    finally:
        live.stop()


@contextlib.contextmanager
def idle_client(live: LiveServer, *, timeout: float = 60, **kwargs: Any) -> Iterator[httpx.Client]:
    """An httpx client on ``live``; when the test is done, the server must have nothing running or waiting."""
    with httpx.Client(base_url=live.url, timeout=timeout, **kwargs) as client:
        yield client
    assert idle(live), live.engine.stats()


def idle(live: LiveServer) -> bool:
    return wait_until(live.idle, timeout=60)


def error_of(response: httpx.Response, status: int | None = None) -> dict:
    """The OpenAI error object of a refusal, after checking its shape (and its status, if given)."""
    if status is not None:
        assert response.status_code == status, response.text
    assert response.status_code >= 400, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["error"]["type"], str) and body["error"]["type"], body
    assert "Traceback" not in response.text
    return body["error"]


def iter_events(lines: Iterator[str]) -> Iterator[Any]:
    """SSE ``data:`` payloads as they arrive, parsed (``"[DONE]"`` stays a string)."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def events_of(lines: Iterator[str]) -> list[Any]:
    return list(iter_events(lines))


def stream(client: httpx.Client, path: str, body: dict) -> tuple[int, list[Any]]:
    """``(status, events)`` of a streamed request (``[error body]`` for a refusal); ``client.last_request_id``
    is the ``x-request-id`` header."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        client.last_request_id = response.headers.get("x-request-id")
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.json()]
        return 200, events_of(response.iter_lines())


def stream_error(events: list[Any]) -> dict | None:
    """The error event of a stream that failed after its 200 (checked to come right before ``[DONE]``)."""
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    if not errors:
        return None
    assert events[-1] == "[DONE]" and events[-2] is errors[-1] and len(errors) == 1, events[-3:]
    error = errors[0]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def choice_tokens(events: list[Any]) -> dict[int, int]:
    """Tokens per choice, counted from the logprobs entries of a stream (each generated token has one)."""
    counts: dict[int, int] = {}
    for event in events:
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices", []):
            logprobs = choice.get("logprobs")
            if logprobs:
                entries = logprobs.get("content") if "content" in logprobs else logprobs.get("tokens")
                counts[choice["index"]] = counts.get(choice["index"], 0) + len(entries or [])
    return counts


def finish_reasons(events: list[Any]) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, dict):
            for choice in event.get("choices", []):
                if choice.get("finish_reason") is not None:
                    reasons.setdefault(choice["index"], []).append(choice["finish_reason"])
    return reasons
