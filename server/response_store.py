"""The Responses API's memory: stored responses, so that ``previous_response_id`` can continue a conversation.

In memory and bounded three ways: at most ``max_entries`` responses, ``max_bytes`` in all, and none older than
``ttl_s`` (the oldest leave first). Each response is kept as one compact JSON blob, so its size is exactly what
it costs: Python objects took about 5x their JSON size, and 3.4 MB of metadata held 18.7 MB per response.

Each response belongs to the tenant (API key) that made it: ``get`` and ``delete`` by another tenant find
nothing, exactly as for an unknown id, so a key cannot read, continue or delete another key's conversations,
nor learn that an id exists. A restart forgets them all; several replicas do not share them (a client that
continues a conversation on another replica gets a 404 and can resend the whole history).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as it was returned
    messages: list[dict[str, Any]]  # the conversation it continues, then its own output, as chat messages
    input_items: list[dict[str, Any]] = field(default_factory=list)  # its own input, as items with ids


@dataclass(eq=False)
class _Entry:
    owner: str | None  # the tenant that made it (None: a server without keys)
    blob: bytes  # [response, messages] as compact JSON
    stored_at: float


class ResponseStore:
    def __init__(self, max_entries: int, ttl_s: float, max_bytes: int = 256 * 2**20, clock=time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def put(self, response_id: str, owner: str | None, response: dict[str, Any],
            messages: list[dict[str, Any]], input_items: list[dict[str, Any]] | None = None) -> bool:
        """Keep a response for its owner, with its own input as items (``GET .../input_items``); False when it is
        larger than the whole store (it is not kept)."""
        if not self.enabled:
            return False
        blob = json.dumps([response, messages, input_items or []], ensure_ascii=False, separators=(",", ":")).encode()
        if len(blob) > self.max_bytes:
            return False
        with self._lock:
            self._drop(response_id)
            self._entries[response_id] = _Entry(owner, blob, self._clock())
            self.nbytes += len(blob)
            while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._expire()
        return True

    def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        with self._lock:
            self._expire()
            entry = self._entries.get(response_id)
            if entry is None or entry.owner != owner:
                return None
        response, messages, input_items = json.loads(entry.blob)
        return StoredResponse(response, messages, input_items)

    def delete(self, response_id: str, owner: str | None) -> bool:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.owner != owner:
                return False
            self._drop(response_id)
            return True

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.nbytes -= len(entry.blob)

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        while self._entries and next(iter(self._entries.values())).stored_at < deadline:  # oldest first
            self._drop(next(iter(self._entries)))
