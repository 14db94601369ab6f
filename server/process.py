"""The serving process: check that the models can be found, bind the port, run uvicorn, drain on SIGTERM.

Start-up failures end the process with status 1 and one line on stderr, ``proxy-serve: error: ...``, never a
traceback: a model that cannot be found or placed (``proxy_engine.placement``, checked before anything
loads), a port that cannot be bound (bound before the models load, so a busy port costs no loading time),
and models that fail to load together (a vocabulary mismatch, say).

SIGTERM or SIGINT: the server keeps listening but admits nothing new (503 ``draining``, and ``/health`` says
``draining`` so that a load balancer takes it out of rotation), lets the running requests finish for up to
``shutdown_grace_s``, then ends whatever is left with a ``shutdown`` error (503, or an error event and
``[DONE]``), shuts the engine down and exits 0. A second signal ends the grace period at once. A signal while
the models are still loading exits 0 at once (the load is abandoned, not awaited).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, NoReturn

import uvicorn

from server.http_protocol import uvicorn_config
from server.serving import ENGINE_CHECK_S, ServerContext
from server.settings import ServerSettings

logger = logging.getLogger("proxy_serve")

# Once the grace period is over: how long the requests it ended have to send their last event.
FLUSH_S = 2 * ENGINE_CHECK_S + 1.0


def fail(message: str) -> int:
    print(f"proxy-serve: error: {message}", file=sys.stderr, flush=True)
    return 1


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.strip().lower() == "localhost"


def warn_if_exposed(settings: ServerSettings) -> None:
    """A loud warning for a port open beyond this machine with no API key: anyone who reaches it can use it."""
    if is_loopback(settings.host) or settings.has_keys:
        return
    hosts = settings.allowed_hosts or ["localhost names only"]
    bar = "!" * 100
    logger.warning(
        "\n%s\nproxy-serve listens on %s:%d, beyond this machine, and NO API KEY is set: anyone who can reach the "
        "port can use the models.\nSet one (--api-key, PROXY_SERVE_API_KEYS or api_keys in the config). Requests are "
        "accepted for hosts: %s (allowed_hosts).\n%s",
        bar, settings.host, settings.port, ", ".join(hosts), bar,
    )


def preflight(settings: ServerSettings) -> str | None:
    """The placement plan's first error (a missing path, an absent GPU, weights too large), or None."""
    from proxy_engine.placement import plan_placement

    return plan_placement(settings.engine).first_error


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn, but a signal drains first (see the module docstring) and the process then exits 0."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext, grace_s: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.grace_s = grace_s
        self.drain_deadline: float | None = None
        self.failed_at: float | None = None  # when the engine was found dead (the process then exits 1)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Not uvicorn's own: it re-raises the signal once shut down, so the process would die by it (status
        # -15) rather than exit 0; and it stops listening at once, so nobody would see /health say draining.
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.grace_s
            self.ctx.drain()
            logger.info("%s: draining; %d request(s) running get up to %gs to finish",
                        signal.Signals(sig).name, self.ctx.in_flight, self.grace_s)
        else:
            self.drain_deadline = time.monotonic()  # a second signal: the grace period is over

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.ctx.engine_failed:
            # The step thread died: open requests got their error (AsyncEngine._fail_all); /health says
            # "failed" while they send it, then the process exits 1 so that an orchestrator restarts it.
            if self.failed_at is None:
                self.failed_at = time.monotonic()
                logger.critical("the engine failed (%s): exiting once open requests have their error",
                                type(self.ctx.engine.fatal_error).__name__)
                self.ctx.drain()
            return time.monotonic() - self.failed_at >= FLUSH_S
        if self.drain_deadline is None:
            return False
        if self.ctx.in_flight == 0:
            logger.info("drained: no request running")
            return True
        if time.monotonic() >= self.drain_deadline:
            self.ctx.expire()
            return True
        return False

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        for listener in getattr(self, "servers", []):
            for sock in listener.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("listening on http://%s:%d (models: %s)", host, port,
                            ", ".join(self.ctx.settings.model_ids))


def serve(settings: ServerSettings) -> int:
    """Serve until a signal (then 0) or a start-up failure (then 1, with one line on stderr)."""
    error = preflight(settings)
    if error is not None:
        return fail(error)
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        return fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")

    from proxy_engine.engine_process import async_engine_for
    from server.app import create_app

    failures: list[BaseException] = []

    def on_load_failure(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    app = create_app(async_engine_for(settings.engine), settings, on_load_failure=on_load_failure)
    warn_if_exposed(settings)
    config = uvicorn_config(app, settings, timeout_graceful_shutdown=FLUSH_S)
    server = DrainingServer(config, app.state.ctx, settings.shutdown_grace_s)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failures:
        return fail(f"failed to load the models: {app.state.ctx.load_error}")
    ctx = app.state.ctx
    if ctx.engine_failed:
        return fail(f"the engine failed: {type(ctx.engine.fatal_error).__name__}: {ctx.engine.fatal_error}")
    if ctx.load_error is None and not ctx.engine.ready and ctx.engine.engine is None:
        # A signal while the models load: the loading thread cannot be interrupted, and the interpreter would
        # wait for it at exit (minutes for a 70B model). Nothing was served and nothing needs cleaning up.
        logger.info("stopped while the models were loading")
        exit_now(0)
    return 0


def exit_now(status: int) -> NoReturn:
    """Exit without the interpreter's teardown, once serving is over (the engine is shut down, the socket closed).

    With torch and three models loaded, the teardown frees module after module for seconds (3-5 s measured on
    two busy cores): time a drain does not have under `docker stop`'s 10 s or a pod's grace period.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
