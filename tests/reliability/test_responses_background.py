"""Background responses (``background: true``): answered at once as ``queued``, run with no client waiting,
read back with GET, cancelled with ``POST /v1/responses/{id}/cancel``. The engine is held with a gate so that a
response is caught while it runs, whatever the machine's speed."""

from __future__ import annotations

import openai
import pytest

from tests.reliability.support import Gate, idle_client, raise_for_seed, served
from tests.server.live import MODEL, wait_until

BODY = {"model": MODEL, "input": "Hello there", "temperature": 0, "max_output_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_family):
    with served(tiny_family) as live:
        yield live


@pytest.fixture()
def http(server):
    with idle_client(server) as client:
        yield client


def _status(http, response_id: str) -> str:
    return http.get(f"/v1/responses/{response_id}").json()["status"]


def test_a_background_response_is_queued_then_read_back_as_the_answer(server, http):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    queued = client.responses.create(background=True, **BODY)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    assert wait_until(lambda: _status(http, queued.id) in ("completed", "incomplete"))
    done = client.responses.retrieve(queued.id)
    same = client.responses.create(**BODY)
    assert done.output_text == same.output_text and done.usage.output_tokens == same.usage.output_tokens
    # a finished background response is returned as it is by cancel
    assert client.responses.cancel(queued.id).status == done.status


def test_a_running_background_response_is_in_progress_and_can_be_cancelled(server, http):
    gate = Gate("decode")
    with server.hooks.on(gate):
        queued = http.post("/v1/responses", json={**BODY, "background": True}).json()
        assert gate.holding.wait(30)  # prefilled, its first token out: held in its first decode step
        assert wait_until(lambda: _status(http, queued["id"]) == "in_progress")
        cancelled = http.post(f"/v1/responses/{queued['id']}/cancel")
        gate.open()
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert wait_until(server.idle)  # its sequence left the engine
    assert _status(http, queued["id"]) == "cancelled"


def test_a_background_failure_is_stored_as_failed(server, http):
    with server.hooks.on(raise_for_seed(4242, "prefill", lambda: RuntimeError("boom"))):
        queued = http.post("/v1/responses", json={**BODY, "background": True, "seed": 4242}).json()
        assert wait_until(lambda: _status(http, queued["id"]) == "failed")
    failed = http.get(f"/v1/responses/{queued['id']}").json()
    assert failed["error"]["code"] == "internal_error" and "RuntimeError" in failed["error"]["message"]


def test_cancel_needs_a_background_response(server, http):
    plain = http.post("/v1/responses", json=BODY).json()
    refused = http.post(f"/v1/responses/{plain['id']}/cancel")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_id"
    assert http.post("/v1/responses/resp_unknown/cancel").status_code == 404
