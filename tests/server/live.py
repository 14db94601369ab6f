"""A real uvicorn server on a loopback port, in a thread, around an app from ``create_app``; or ``proxy-serve``
itself in a subprocess (``cli_server``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from server.app import create_app
from server.http_protocol import uvicorn_config
from server.settings import ServerSettings, load_settings

MODEL = "proxy-tuned"
API_KEY = "sk-test-key-123"
ORIGIN = "http://frontend.example"


def make_settings(family, *, limits: dict | None = None, runtime: dict | None = None,
                  **server: object) -> ServerSettings:
    engine = {
        "base": {"path": str(family.base)},
        "experts": [{"expert": {"path": str(family.expert)}, "anti_expert": {"path": str(family.anti_expert)}}],
        "limits": limits or {},
        "runtime": runtime or {},
    }
    return load_settings(overrides={"engine": engine, **server}, environ=False)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true; a generous cap so a stuck server fails instead of hanging the suite."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class LiveServer:
    def __init__(self, engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.app = create_app(engine, settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.app, settings, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def ctx(self):
        return self.app.state.ctx

    def start(self, timeout: float = 120) -> LiveServer:
        """Serve, and wait until healthy (``timeout``: a real model loads for minutes on a shared machine)."""
        self.thread.start()

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(healthy, timeout=timeout, interval=0.1):
            raise RuntimeError(f"server did not become healthy (load error: {self.ctx.load_error})")
        return self

    def idle(self) -> bool:
        stats = self.engine.stats()
        return stats.running == 0 and stats.waiting == 0 and stats.prefilling == 0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def serving(settings: ServerSettings) -> Iterator[tuple[LiveServer, httpx.Client]]:
    """A live server around the engine ``settings`` ask for (in its own process by default), and a client of it."""
    from proxy_engine.engine_process import async_engine_for

    live = LiveServer(async_engine_for(settings.engine), settings).start()
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            yield live, client
    finally:
        live.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def cli_server(args: list[str], log: Path, *, env: dict | None = None,
               timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m server ARGS --port P``, its output in ``log``: yields ``(url, process)`` once healthy, then sends
    SIGTERM; when the block ends the process has exited (``process.returncode``), or it was killed and this raises."""
    port = free_port()
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "server", *args, "--port", str(port)], stdout=sink,
                                   stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None

        assert wait_until(healthy, timeout=timeout, interval=0.2) and process.poll() is None, Path(log).read_text()
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
