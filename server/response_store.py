"""The Responses API's memory: stored responses, so that ``previous_response_id`` can continue a conversation.

In memory and bounded both ways: at most ``max_entries`` responses (the oldest leave first) and none older
than ``ttl_s``. A restart forgets them all; several replicas do not share them (a client that
continues a conversation on another replica gets a 404 and can resend the whole history).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as it was returned
    messages: list[dict[str, Any]]  # the conversation it continues, then its own output, as chat messages
    stored_at: float


class ResponseStore:
    def __init__(self, max_entries: int, ttl_s: float, clock=time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def put(self, response_id: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._entries[response_id] = StoredResponse(response, messages, self._clock())
            self._entries.move_to_end(response_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self._expire()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            self._expire()
            return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._entries.pop(response_id, None) is not None

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        while self._entries and next(iter(self._entries.values())).stored_at < deadline:  # oldest first
            self._entries.popitem(last=False)
