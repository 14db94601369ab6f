"""Admission: which waiting sequences start prefilling, within the batch and queue limits."""

from __future__ import annotations

from collections import deque

from proxy_engine.config import LimitsConfig
from proxy_engine.sequence import Sequence


class Scheduler:
    """A FIFO waiting queue. Admits whole groups of sequences while the running batch has room."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.waiting: deque[Sequence] = deque()

    def has_room_for(self, count: int, queued: int, in_batch: int) -> bool:
        """Whether ``count`` more sequences fit: the free batch slots, then ``max_waiting`` queued ones.

        ``queued`` counts sequences not yet admitted (including those not yet handed to the scheduler);
        ``in_batch`` those running or prefilling.
        """
        free_slots = max(0, self.limits.max_num_seqs - in_batch)
        return queued + count <= self.limits.max_waiting + free_slots

    def add(self, sequences: list[Sequence]) -> None:
        self.waiting.extend(sequences)

    def admit(self, running: int) -> list[Sequence]:
        """Sequences to prefill next: FIFO, up to the free batch slots and about one step's token budget.

        The first waiting sequence is always admitted when a slot is free, however long its prompt: its
        prefill is chunked, so it cannot stall the running streams.
        """
        admitted: list[Sequence] = []
        budget = self.limits.max_num_batched_tokens
        width = 0
        prompts: set[tuple] = set()  # a prompt already admitted costs nothing more: its prefill is shared
        while self.waiting and running + len(admitted) < self.limits.max_num_seqs:
            candidate = self.waiting[0]
            longest = max(len(p) for p in candidate.prompts.values())
            key = tuple((index, tuple(ids)) for index, ids in sorted(candidate.prompts.items()))
            padded = max(width, longest) * (len(prompts) + (key not in prompts))
            if admitted and key not in prompts and padded > budget:
                break
            admitted.append(self.waiting.popleft())
            prompts.add(key)
            width = max(width, longest)
        return admitted

    def remove(self, predicate) -> list[Sequence]:
        removed = [s for s in self.waiting if predicate(s)]
        if removed:
            self.waiting = deque(s for s in self.waiting if not predicate(s))
        return removed
