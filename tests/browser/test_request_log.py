"""The request-log reader the Open WebUI check relies on, on lines as the server writes them."""

from __future__ import annotations

from tests.browser.request_log import read_refusals, read_requests

LOG = """\
DEBUG proxy_serve.requests: chatcmpl-a chat keys=max_tokens,messages,model,stream messages=1 prompt_tokens=296
DEBUG proxy_serve.requests: chatcmpl-b chat keys=messages,model,stream,tools tools=36 tool_choice=- prompt_tokens=39
WARNING proxy_serve: 36 tool(s) under tool_choice auto were left out: ...
INFO proxy_serve.requests: chatcmpl-b model=proxy-real status=200 prompt_tokens=39
INFO proxy_serve.requests: chatcmpl-a model=proxy-real status=200 prompt_tokens=296
DEBUG proxy_serve.requests: chatcmpl-c chat keys=messages,model messages=1 prompt_tokens=? (refused)
INFO proxy_serve.requests: chatcmpl-c model=unknown status=404 error="model 'nope' does not exist"
DEBUG proxy_serve.requests: chatcmpl-d chat keys=messages,model,stream messages=2 prompt_tokens=12
INFO proxy_serve.requests: refused POST /v1/chat/completions status=401 error='incorrect API key'
"""


def test_requests_in_arrival_order_with_shape_and_status():
    a, b, c, d = read_requests(LOG)
    assert [r.request_id for r in (a, b, c, d)] == ["chatcmpl-a", "chatcmpl-b", "chatcmpl-c", "chatcmpl-d"]
    assert (a.status, a.model, a.tools) == ("200", "proxy-real", 0)
    assert a.keys == ["max_tokens", "messages", "model", "stream"]
    assert (b.status, b.tools) == ("200", 36) and "tool_choice=-" in (b.shape or "")
    assert (c.status, c.model) == ("404", "unknown")
    assert d.status is None  # still running


def test_refusals_before_any_generation():
    assert read_refusals(LOG) == ["POST /v1/chat/completions 401 error='incorrect API key'"]
