"""Background responses (``background: true``): answered at once as ``queued``, run with no client waiting,
read back with GET, cancelled with ``POST /v1/responses/{id}/cancel``. The engine is held with a gate so that a
response is caught while it runs, whatever the machine's speed."""

from __future__ import annotations

import json

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


def _events(lines) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


def _text(events: list[dict]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_a_streamed_background_response_is_followed_and_replayed_from_any_event(server, http):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    foreground = client.responses.create(**BODY)
    streamed = list(client.responses.create(background=True, stream=True, **BODY))
    kinds = [event.type for event in streamed]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert streamed[0].response.status == "queued" and streamed[0].response.background is True
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in streamed] == list(range(len(streamed)))
    done = streamed[-1].response
    assert done.output_text == foreground.output_text and client.responses.retrieve(done.id).status == done.status
    # The SDK's resume: every event after the one given, the same events; with no starting_after, all of them.
    for after in (-1, 0, 4, len(streamed) - 2):
        again = list(client.responses.retrieve(done.id, stream=True, starting_after=after))
        assert [e.model_dump() for e in again] == [e.model_dump() for e in streamed[after + 1:]]
    assert len(list(client.responses.retrieve(done.id, stream=True))) == len(streamed)


def test_a_dropped_follower_does_not_stop_the_response_and_resumes_where_it_left(server, http):
    gate = Gate("decode")
    with server.hooks.on(gate):
        with http.stream("POST", "/v1/responses", json={**BODY, "background": True, "stream": True,
                                                        "max_output_tokens": 12}) as response:
            response_id = response.headers["x-request-id"]
            seen: list[dict] = []
            for line in response.iter_lines():  # up to the first token's text, then the client leaves
                seen += _events([line])
                if seen and seen[-1]["type"] == "response.output_text.delta":
                    break
        assert gate.holding.wait(30)
        gate.open()
    assert wait_until(lambda: _status(http, response_id) in ("completed", "incomplete"))
    with http.stream("GET", f"/v1/responses/{response_id}",
                     params={"stream": "true", "starting_after": seen[-1]["sequence_number"]}) as response:
        assert response.status_code == 200
        rest = _events(response.iter_lines())
    assert [e["sequence_number"] for e in seen + rest] == list(range(len(seen) + len(rest)))
    final = http.get(f"/v1/responses/{response_id}").json()
    assert rest[-1]["response"] == final
    assert _text(seen + rest) == final["output"][0]["content"][0]["text"]


def test_a_cancelled_response_keeps_its_answer_so_far(server, http):
    whole = http.post("/v1/responses", json=BODY).json()["output"][0]["content"][0]["text"]
    gate = Gate("decode")
    with server.hooks.on(gate):
        queued = http.post("/v1/responses", json={**BODY, "background": True}).json()
        assert gate.holding.wait(30)  # its first token out, held in its first decode step
        assert wait_until(lambda: _status(http, queued["id"]) == "in_progress")
        cancelled = http.post(f"/v1/responses/{queued['id']}/cancel").json()
        gate.open()
    assert cancelled["status"] == "cancelled" and cancelled["usage"]["output_tokens"] == 1
    message = cancelled["output"][0]
    assert message["status"] == "incomplete" and message["content"][0]["text"]
    assert whole.startswith(message["content"][0]["text"])
    assert wait_until(server.idle)
    assert http.get(f"/v1/responses/{queued['id']}").json() == cancelled
    with http.stream("GET", f"/v1/responses/{queued['id']}", params={"stream": "true"}) as response:
        events = _events(response.iter_lines())  # ends: a cancelled response's log is closed
    assert events[-1]["type"] == "response.output_item.done" and events[-1]["item"] == message


def test_only_a_background_response_streams_again(server, http):
    plain = http.post("/v1/responses", json=BODY).json()
    refused = http.get(f"/v1/responses/{plain['id']}", params={"stream": "true"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    assert http.get(f"/v1/responses/{plain['id']}", params={"starting_after": 3}).json() == plain  # no stream: a hint
    background = http.post("/v1/responses", json={**BODY, "background": True}).json()
    assert wait_until(lambda: _status(http, background["id"]) in ("completed", "incomplete"))
    bad = http.get(f"/v1/responses/{background['id']}", params={"stream": "true", "starting_after": -5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"
    assert http.get("/v1/responses/resp_unknown", params={"stream": "true"}).status_code == 404
