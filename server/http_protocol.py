"""uvicorn's h11 protocol with what it lacks for a server facing careless or hostile clients.

- A header timeout: a connection must complete a request's head within ``header_timeout_s`` of opening (or of
  its previous response), or it is closed. uvicorn's keep-alive timer is reset by every byte, so a client
  trickling a header a byte at a time (slowloris) would otherwise hold its socket forever.
- uvicorn's own refusals in the OpenAI shape: a malformed request (or a head past ``max_header_bytes``) gets
  ``{"error": {...}}`` with 400, and a request past ``limit_concurrency`` a 503, instead of plain text.

``uvicorn_config`` builds the ``uvicorn.Config`` from the settings: every limit and timeout in one place.
"""

from __future__ import annotations

import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from proxy_engine.request import ErrorCode
from server.errors import error_body


def _json(status: int, message: str, kind: str, code: str) -> bytes:
    return json.dumps(error_body(message, type=kind, code=code), separators=(",", ":")).encode("ascii")


async def _service_unavailable(scope: Any, receive: Any, send: Any) -> None:
    body = _json(503, "the server is at its connection limit (limit_concurrency); retry shortly",
                 "service_unavailable", ErrorCode.SERVER_OVERLOADED.value)
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# uvicorn answers a request past limit_concurrency with its h11 module's ``service_unavailable`` (plain text):
# this process's uvicorn answers in the OpenAI shape instead.
h11_impl.service_unavailable = _service_unavailable


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 30.0  # set per server by uvicorn_config (a subclass)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if not self.transport.is_closing():
            self.loop.call_later(self.header_timeout_s, self._header_timeout, self.cycle)

    def _header_timeout(self, cycle_then: Any) -> None:
        # Still no new request since the timer was armed, and still waiting for (the rest of) its head.
        if self.cycle is cycle_then and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        message = (f"invalid HTTP request: {msg.rstrip('.')} (a malformed request line or headers, or a head larger "
                   "than max_header_bytes)")
        body = _json(400, message, "invalid_request_error", ErrorCode.INVALID_HTTP_REQUEST.value)
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            try:
                self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # h11 cannot answer in this state: just close
                break
        self.transport.close()


def uvicorn_config(app: Any, settings: Any, **overrides: Any) -> uvicorn.Config:
    protocol = type("ServerH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": settings.header_timeout_s})
    options: dict[str, Any] = {
        "http": protocol,  # h11 (GuardedH11Protocol), whatever else is installed
        "loop": "asyncio",  # not uvloop, even when an extra (Ray) installs it
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.timeout_keep_alive_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "log_level": settings.uvicorn_log_level or settings.log_level,
        "log_config": None,
        "access_log": False,  # one line per request comes from the server itself
        "root_path": settings.root_path,
        "ssl_keyfile": settings.ssl_keyfile,
        "ssl_certfile": settings.ssl_certfile,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
