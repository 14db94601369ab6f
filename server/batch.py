"""``proxy-serve run-batch``: OpenAI's batch file format, run offline through the same app that serves HTTP
(vLLM's ``vllm run-batch``).

Each input line is a request, ``{"custom_id", "method": "POST", "url", "body"}``, for ``/v1/chat/completions``,
``/v1/completions`` or ``/v1/responses``. Each output line answers one, in input order:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``. A request the server refuses
keeps its status and its error body in ``response`` (OpenAI's shape) and its code and message in ``error`` too (where
vLLM's runner puts them); a line that is not a request gets ``response: null`` and the reason in ``error``.

The requests go through the app in process (``httpx.ASGITransport``: no port is opened), so a line is validated,
rendered and answered exactly as the same request over HTTP. Up to twice ``max_num_seqs`` requests are in flight,
which keeps the batch full; a request the queue turns away (429) is sent again once there is room, so none is lost
to back-pressure. Outputs are written as they complete, earlier ones first, so memory holds only the requests in
flight and those finished ahead of an earlier one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from server.settings import ServerSettings

logger = logging.getLogger("proxy_serve")

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_QUEUE_FULL = 429
_RETRY_S = (0.05, 1.0)  # the wait before sending a turned-away request again: first, then at most (doubling)
_PROGRESS_S = 10.0


@dataclass
class BatchSummary:
    requests: int = 0
    failed: int = 0  # lines whose response is not a 200, or that were not requests
    completion_tokens: int = 0
    seconds: float = 0.0  # from the models loaded to the last answer


def _error_line(custom_id: str | None, message: str, code: str = "invalid_request") -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def parse_line(text: str) -> tuple[str | None, dict[str, Any] | str]:
    """A line as (its custom_id, the request ``{"url", "body"}``), or (its custom_id if any, why it is not one)."""
    try:
        line = json.loads(text)
    except ValueError as error:
        return None, f"not JSON: {error}"
    if not isinstance(line, dict):
        return None, "a line must be a JSON object with custom_id, method, url and body"
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str):
        return None, "custom_id: required, a string"
    missing = [key for key in ("method", "url", "body") if key not in line]
    if missing:
        return custom_id, f"{', '.join(missing)}: required"
    if line["method"] != "POST":
        return custom_id, f"method: only POST is supported, got {line['method']!r}"
    if line["url"] not in URLS:
        return custom_id, f"url: {line['url']!r} is not served in a batch; these are: {', '.join(URLS)}"
    if not isinstance(line["body"], dict):
        return custom_id, "body: must be a JSON object (the request)"
    if line["body"].get("stream"):
        return custom_id, "body.stream: a batch request must not be streamed"
    return custom_id, {"url": line["url"], "body": line["body"]}


class OrderedWriter:
    """Output lines in input order: each is held until every earlier one is written."""

    def __init__(self, sink: IO[str]) -> None:
        self.sink = sink
        self.next = 0
        self.held: dict[int, dict[str, Any]] = {}

    def put(self, index: int, line: dict[str, Any]) -> None:
        self.held[index] = line
        while self.next in self.held:
            self.sink.write(json.dumps(self.held.pop(self.next), ensure_ascii=False) + "\n")
            self.next += 1
        self.sink.flush()


async def _send(client: httpx.AsyncClient, ctx, request: dict[str, Any]) -> httpx.Response:
    """POST the request; sent again while the queue turns it away (the server's back-pressure, not an answer)."""
    wait = _RETRY_S[0]
    while True:
        response = await client.post(request["url"], json=request["body"])
        if response.status_code != _QUEUE_FULL or not ctx.ready:
            return response
        await asyncio.sleep(wait)
        wait = min(wait * 2, _RETRY_S[1])


def _output(custom_id: str, response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text, "type": "server_error", "code": None}}
    line: dict[str, Any] = {
        "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
        "response": {"status_code": response.status_code, "request_id": response.headers.get("x-request-id"),
                     "body": body},
        "error": None,
    }
    if response.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        line["error"] = {"code": error.get("code") or str(response.status_code),
                         "message": error.get("message") or response.text}
    return line


def _completion_tokens(line: dict[str, Any]) -> int:
    body = (line.get("response") or {}).get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    count = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return count if isinstance(count, int) else 0


async def run_batch(app, lines: Iterator[str], sink: IO[str], *, concurrency: int | None = None) -> BatchSummary:
    """Answer every request of ``lines`` through ``app`` (``create_app``'s, not started: this starts and stops it)
    into ``sink``, in input order."""
    ctx = app.state.ctx
    summary = BatchSummary()
    writer = OrderedWriter(sink)
    keys = ctx.settings.api_key_values()
    headers = {"Authorization": f"Bearer {next(iter(keys))}"} if keys else {}
    async with app.router.lifespan_context(app):
        while not ctx.ready and ctx.load_error is None:
            await asyncio.sleep(0.05)
        if ctx.load_error is not None:
            raise RuntimeError(f"failed to load the models: {ctx.load_error}")
        started = time.monotonic()  # the batch's time, not the models' loading
        limit = asyncio.Semaphore(concurrency or 2 * ctx.settings.engine.limits.max_num_seqs)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 line, not a stopped batch
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers,
                                     timeout=None) as client:
            tasks: set[asyncio.Task] = set()
            seen: set[str] = set()
            last_report = time.monotonic()

            def done(index: int, line: dict[str, Any]) -> None:
                nonlocal last_report
                summary.failed += line["error"] is not None
                summary.completion_tokens += _completion_tokens(line)
                writer.put(index, line)
                if time.monotonic() - last_report > _PROGRESS_S:
                    last_report = time.monotonic()
                    logger.info("batch: %d of %d read answered (%d failed)", writer.next, summary.requests,
                                summary.failed)

            async def answer(index: int, custom_id: str, request: dict[str, Any]) -> None:
                try:
                    line = _output(custom_id, await _send(client, ctx, request))
                except Exception as error:  # noqa: BLE001 - one line fails, the batch goes on
                    logger.exception("batch line %d (%s) failed", index, custom_id)
                    line = _error_line(custom_id, f"{type(error).__name__}: {error}", "internal_error")
                finally:
                    limit.release()
                done(index, line)

            for text in lines:
                if not text.strip():
                    continue
                index = summary.requests
                summary.requests += 1
                custom_id, request = parse_line(text)
                if custom_id is not None and custom_id in seen:
                    request = f"custom_id: {custom_id!r} is used by an earlier line; each must be unique"
                if isinstance(request, str):
                    done(index, _error_line(custom_id, request))
                    continue
                seen.add(custom_id)
                await limit.acquire()
                task = asyncio.create_task(answer(index, custom_id, request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
    summary.seconds = time.monotonic() - started
    return summary


# --- the command line ----------------------------------------------------------------------------------------------
def batch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxy-serve run-batch",
        description="Run an OpenAI batch file (JSON lines) through the server offline; the other flags are "
                    "proxy-serve's (the models, --config, limits, ...).")
    parser.add_argument("-i", "--input-file", required=True,
                        help="The batch file: a path, '-' for standard input, or an http(s) URL to GET.")
    parser.add_argument("-o", "--output-file", required=True,
                        help="Where the answers go: a path, '-' for standard output, or an http(s) URL to PUT.")
    return parser


def _input_lines(source: str) -> Iterator[str]:
    if source == "-":
        yield from sys.stdin
    elif source.startswith(("http://", "https://")):
        response = httpx.get(source, timeout=300, follow_redirects=True)
        response.raise_for_status()
        yield from response.text.splitlines()
    else:
        with open(source, encoding="utf-8") as lines:
            yield from lines


@contextlib.contextmanager
def _output_sink(target: str) -> Iterator[IO[str]]:
    """The file answers are written to; an URL gets the whole file by PUT once the batch is done."""
    if target == "-":
        yield sys.stdout
        return
    if not target.startswith(("http://", "https://")):
        Path(target).expanduser().parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", encoding="utf-8") as sink:
            yield sink
        return
    with tempfile.NamedTemporaryFile("w+", encoding="utf-8", suffix=".jsonl") as sink:
        yield sink
        sink.flush()
        with open(sink.name, "rb") as body:
            httpx.put(target, content=body, timeout=1000).raise_for_status()


def run_batch_command(settings: ServerSettings, input_file: str, output_file: str) -> int:
    """Run the batch; 0 once every line is answered (some may be errors, as in OpenAI's batches), 1 when the models
    do not load or a file cannot be read or written."""
    from proxy_engine.engine_process import async_engine_for
    from server.app import create_app
    from server.process import fail, preflight

    error = preflight(settings)
    if error is not None:
        return fail(error)
    app = create_app(async_engine_for(settings.engine), settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its line per request says what the request log says
    try:
        with _output_sink(output_file) as sink:
            summary = asyncio.run(run_batch(app, _input_lines(input_file), sink))
    except (OSError, httpx.HTTPError, RuntimeError, UnicodeDecodeError) as error:
        return fail(f"run-batch: {error}")
    rate = summary.completion_tokens / summary.seconds if summary.seconds else 0.0
    logger.info("batch done: %d requests, %d failed, %d completion tokens in %.1f s (%.1f tokens/s)",
                summary.requests, summary.failed, summary.completion_tokens, summary.seconds, rate)
    return 0
