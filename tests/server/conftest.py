"""Server fixtures: real servers on loopback ports around real engines on the tiny family (built once per
session by ``tests/conftest.py``), plus the OpenAI SDK and httpx clients pointed at them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402

from proxy_engine.engine_process import async_engine_for  # noqa: E402
from tests.server.live import API_KEY, ORIGIN, LiveServer, make_settings, wait_until  # noqa: E402


def _serve(settings):
    server = LiveServer(async_engine_for(settings.engine), settings).start()
    return server


@pytest.fixture(scope="session")
def live(tiny_family):
    """The open server: default limits, no key."""
    server = _serve(make_settings(tiny_family))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def guarded(tiny_family):
    """A key, CORS for one origin, a 16 KiB body limit, and room for one sequence and no queue."""
    settings = make_settings(
        tiny_family, limits={"max_num_seqs": 1, "max_waiting": 0}, api_keys=[API_KEY], allowed_origins=[ORIGIN],
        max_body_bytes=16 * 1024,
    )
    server = _serve(settings)
    yield server
    server.stop()


@pytest.fixture()
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _servers_idle_after(request):
    """Every test leaves the servers it used with nothing running, so tests stay independent."""
    yield
    for name in ("live", "guarded", "agent"):
        if name in request.fixturenames:
            server = request.getfixturevalue(name)
            assert wait_until(server.idle, timeout=60), f"{name} server still busy: {server.engine.stats()}"


# A chat template that writes the tools and earlier calls (as real families' templates do), for the chat expert.
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>{{ tools | tojson }}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% else %}{{ m['content'] }}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def agent_family(tmp_path_factory):
    """The tiny family with room for tool lists (2,048 positions) and a chat-format expert."""
    from proxy_engine.families import build_family

    return build_family(tmp_path_factory.mktemp("agent"), chat_expert=True, max_position_embeddings=2048)


@pytest.fixture(scope="session")
def agent(agent_family):
    """A server for agents' requests: tools, structured outputs, the Responses API."""
    from server.settings import load_settings

    engine = {
        "base": {"path": str(agent_family.base)},
        "experts": [{"expert": {"path": str(agent_family.expert), "prompt_format": "chat",
                                "chat_template": TOOL_CHAT_TEMPLATE},
                     "anti_expert": {"path": str(agent_family.anti_expert)}}],
    }
    server = _serve(load_settings(overrides={"engine": engine}, environ=False))
    yield server
    server.stop()


@pytest.fixture()
def agent_client(agent) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def agent_http(agent):
    with httpx.Client(base_url=agent.url, timeout=60) as c:
        yield c
