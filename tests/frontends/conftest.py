"""Frontend fixtures: one real server on a loopback port (API key, CORS for a browser origin, a short context so
that requests without ``max_tokens`` stay quick), started the way ``tests/server`` starts its servers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import pytest  # noqa: E402

from proxy_engine.async_engine import AsyncEngine  # noqa: E402
from tests.frontends.calls import API_KEY, BROWSER_ORIGIN  # noqa: E402
from tests.server.live import LiveServer, make_settings, wait_until  # noqa: E402


@pytest.fixture(scope="session")
def frontend_server(tiny_family):
    """Served as a deployment behind a frontend would be: ``--api-key`` and ``--allowed-origins``.

    ``max_model_len`` 256 bounds the requests that (like every frontend by default) send no ``max_tokens``:
    they run to the end of the context, which must stay fast here.
    """
    settings = make_settings(
        tiny_family, limits={"max_model_len": 256}, api_keys=[API_KEY], allowed_origins=[BROWSER_ORIGIN],
    )
    server = LiveServer(AsyncEngine(settings.engine), settings).start()
    yield server
    server.stop()


@pytest.fixture()
def base_url(frontend_server) -> str:
    return f"{frontend_server.url}/v1"


@pytest.fixture()
def http(frontend_server):
    with httpx.Client(base_url=frontend_server.url, timeout=60) as client:
        yield client


@pytest.fixture(autouse=True)
def _server_idle_after(request):
    """Every test leaves the server with nothing running, so tests stay independent."""
    yield
    if "frontend_server" in request.fixturenames:
        server = request.getfixturevalue("frontend_server")
        assert wait_until(server.idle, timeout=60), f"server still busy: {server.engine.stats()}"
