"""Background responses (the Responses API's ``background: true``): each one's stream events, kept so that a client
can follow it while it runs, or come back after a dropped connection and resume after the last event it saw
(``GET /v1/responses/{id}?stream=true&starting_after=N``, as OpenAI's).

Event ``i`` of a response has ``sequence_number`` ``i``, so resuming is an index into its log. Logs live in memory:
a running response's until it ends, then the most recent finished ones' (at most ``KEEP_FINISHED`` of them and
``KEEP_BYTES`` in all). The stored response itself (``ResponseStore``) outlives its log: a GET without ``stream``
still reads it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.serving import Generation

KEEP_FINISHED = 64  # finished responses whose events may still be streamed again
KEEP_BYTES = 64 * 2**20  # and at most this many bytes of their events


class EventLog:
    """A response's server-sent events in order; ``follow`` replays them and then waits for more until closed."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.nbytes = 0
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, event: str) -> None:
        self.events.append(event)
        self.nbytes += len(event)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # followers wait on the next change

    async def follow(self, starting_after: int = -1) -> AsyncIterator[str]:
        """The events whose sequence number is above ``starting_after``, as they come, until the log closes."""
        index = max(0, starting_after + 1)
        while True:
            changed = self._changed  # taken before the check: an append after it sets this one
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.closed:
                return
            await changed.wait()


@dataclass(eq=False)
class BackgroundRun:
    owner: str | None  # the tenant that made it: nobody else may follow or cancel it
    generation: Generation
    log: EventLog = field(default_factory=EventLog)
    task: asyncio.Task | None = None  # what drives the generation and writes the log
    on_cancel: Callable[[], None] = lambda: None  # aborts the request, stores the cancelled response (idempotent)
    settled: bool = False  # its final state (completed, incomplete, failed or cancelled) is stored

    async def cancel(self) -> None:
        """Stop it where it is: the task ends, the engine request is aborted, the partial answer is stored."""
        if self.task is not None and self.task.cancel():
            await asyncio.wait({self.task})
        self.on_cancel()  # a task cancelled before its first step never ran its own handler


class BackgroundRuns:
    """The running background responses, and the logs of the last ones that finished."""

    def __init__(self, keep: int = KEEP_FINISHED, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep = keep
        self.keep_bytes = keep_bytes
        self.running: dict[str, BackgroundRun] = {}
        self.finished: OrderedDict[str, BackgroundRun] = OrderedDict()
        self._finished_bytes = 0

    def start(self, response_id: str, run: BackgroundRun) -> BackgroundRun:
        self.running[response_id] = run
        return run

    def get(self, response_id: str, owner: str | None, *, running_only: bool = False) -> BackgroundRun | None:
        run = self.running.get(response_id)
        if run is None and not running_only:
            run = self.finished.get(response_id)
        return run if run is not None and run.owner == owner else None

    def end(self, response_id: str) -> None:
        """The run is over: its log closes (followers get the rest and stop) and joins the finished ones."""
        run = self.running.pop(response_id, None)
        if run is None:
            return
        run.log.close()
        self.finished[response_id] = run
        self._finished_bytes += run.log.nbytes
        while self.finished and (len(self.finished) > self.keep or self._finished_bytes > self.keep_bytes):
            _, oldest = self.finished.popitem(last=False)
            self._finished_bytes -= oldest.log.nbytes
