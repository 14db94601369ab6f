"""Who is where: every sequence is waiting, prefilling or running, and the scheduler is the one that moves it.

    add -> waiting --admit--> prefilling --promote--> running --retire--> (gone)
                 ^---------preempt, preempt_all--------------'
    remove: out of any of the three (abort, timeout)

The engine asks the scheduler, never its own lists; the runners' rows follow ``running`` (the engine syncs
them once per step). This module imports no torch, so the server can apply ``has_room`` (the queue bound)
before it renders a prompt.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from proxy_engine.config import LimitsConfig

if TYPE_CHECKING:
    from proxy_engine.sequence import Sequence


def has_room(limits: LimitsConfig, count: int, queued: int, in_batch: int) -> bool:
    """Whether ``count`` more sequences fit: the free batch slots, then ``max_waiting`` queued ones.

    ``queued`` counts sequences not yet admitted (including those not yet handed to the scheduler);
    ``in_batch`` those running or prefilling.
    """
    free_slots = max(0, limits.max_num_seqs - in_batch)
    return queued + count <= limits.max_waiting + free_slots


def with_running_cap(limits: LimitsConfig, cap: int) -> LimitsConfig:
    """``limits`` as the engine applies them: ``max_num_seqs`` lowered to ``cap`` where its static K/V buffers
    hold fewer rows (``cap`` 0, or one at least ``max_num_seqs``: the limits as configured)."""
    if 0 < cap < limits.max_num_seqs:
        return limits.model_copy(update={"max_num_seqs": cap})
    return limits


def cached_columns_lost(rows: list[tuple[int, int]]) -> int:
    """Cached prompt tokens a group of prompts (each ``(length, cached tokens)``) would compute again, prefilled
    together: left-padded to the longest, the group starts at its lowest uncached column, and each row's cached
    columns before that are computed anyway."""
    if not rows:
        return 0
    width = max(length for length, _ in rows)
    start = min(width - length + hit for length, hit in rows)
    return sum(hit - min(hit, max(0, start - (width - length))) for length, hit in rows)


def _prompt_key(sequence: Sequence) -> tuple:
    return tuple((index, tuple(sequence.context_ids(index))) for index in sequence.runners)


def _priority(sequence: Sequence) -> int:
    return sequence.params.priority


MEMORY_GROW_STEPS = 64  # decode steps without running out of memory before the memory cap takes one more sequence


def _urgency(sequence: Sequence) -> tuple[int, float]:
    """The priority order: lower priority values first, then earlier arrivals."""
    return sequence.params.priority, sequence.arrival


class Scheduler:
    """The waiting queue (in arrival order, or by priority then arrival under ``scheduling_policy: priority``), the
    group being prefilled, the running batch.

    Under ``priority`` a waiting sequence more urgent than a running one takes its slot (``preempt``: vLLM's
    priority preemption, by recomputation). The running one goes back to the queue without its K/V and, once
    admitted again, prefills its prompt and the tokens it had generated, then goes on: its client sees a pause,
    never a repeated or lost token.

    A decode step that runs out of memory preempts the whole batch (``preempt_all``) and halves the running
    batch's cap (``memory_cap``), which then grows back by one sequence every ``MEMORY_GROW_STEPS`` good steps
    (additive increase, multiplicative decrease): the batch settles at what the memory holds, where the step
    would otherwise fail every running request. A prefill that runs out of memory goes back to the queue whole
    (``defer_prefilling``) with the batch capped at the sequences running, so that it is tried again, in smaller
    groups, as they finish."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.running_version = 0  # changes whenever a sequence joins or leaves ``running``
        self.preemptions_total = 0
        self.memory_cap: int | None = None  # running sequences the memory held, after running out of it
        self._good_steps = 0

    # --- counts ----------------------------------------------------------------------------------------------
    @property
    def batch_limit(self) -> int:
        """Sequences the batch may hold now: ``max_num_seqs``, or fewer after running out of memory."""
        if self.memory_cap is None:
            return self.limits.max_num_seqs
        return min(self.limits.max_num_seqs, self.memory_cap)

    @property
    def in_batch(self) -> int:
        """Sequences holding (or about to hold) a batch slot: running or prefilling, and not finished."""
        return sum(not s.finished for s in self.running) + sum(not s.finished for s in self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def active(self) -> Iterator[Sequence]:
        yield from self.waiting
        yield from self.prefilling
        yield from self.running

    # --- moves -----------------------------------------------------------------------------------------------
    def add(self, sequences: list[Sequence]) -> None:
        if self.limits.scheduling_policy == "fcfs":
            self.waiting.extend(sequences)
            return
        for sequence in sequences:  # after every waiting sequence of the same or a lower priority value
            bisect.insort_right(self.waiting, sequence, key=_priority)

    def admit(self, cached: Callable[[Sequence], int] | None = None, block: int = 1) -> list[Sequence]:
        """Move the next group from waiting to prefilling: in queue order, up to the free batch slots and about one
        step's token budget (``max_num_batched_tokens`` of left-padded prompt).

        The first waiting sequence is always admitted when a slot is free, however long its prompt: its
        prefill is chunked, so it cannot stall the running streams. A prompt already admitted costs nothing
        more: its prefill is shared.

        ``cached``: how many of a sequence's prompt tokens its prefix cache holds. A group's prefill starts at its
        lowest uncached column, so a warm prompt beside a cold one would compute its cached columns again: the
        group ends where a newcomer would throw ``block`` tokens or more of cached prefixes away (its own or the
        group's), and the newcomer heads the next group.
        """
        if not self.waiting:
            return []
        admitted: list[Sequence] = []
        budget = self.limits.max_num_batched_tokens
        in_batch = self.in_batch
        width = 0
        prompts: set[tuple] = set()
        rows: list[tuple[int, int]] = []  # each distinct prompt's (length, cached tokens)
        lost = 0  # cached_columns_lost(rows)
        while self.waiting and in_batch + len(admitted) < self.batch_limit:
            candidate = self.waiting[0]
            key = _prompt_key(candidate)
            if key not in prompts:  # a prompt already admitted costs nothing more: its prefill is shared
                longest = max(len(ids) for _, ids in key)
                if admitted and max(width, longest) * (len(prompts) + 1) > budget:
                    break
                if cached is not None:
                    grown = [*rows, (len(key[0][1]), cached(candidate))]  # the primary model's context
                    grown_lost = cached_columns_lost(grown)
                    if admitted and grown_lost - lost >= block:
                        break
                    rows, lost = grown, grown_lost
                prompts.add(key)
                width = max(width, longest)
            admitted.append(self.waiting.popleft())
        for sequence in admitted:
            sequence.start_prefill()
        self.prefilling += admitted
        return admitted

    def preempt(self) -> list[Sequence]:
        """Under ``priority``, with the batch full: take from ``running`` the least urgent sequences (highest
        priority value, then latest arrival) that are less urgent than a waiting one the free slots cannot take,
        one per such waiting sequence, and queue them again in priority order. Their runners' rows go at the
        engine's next sync. Call it only between prefill groups (a victim's slot is for the next ``admit``)."""
        if self.limits.scheduling_policy != "priority" or not self.waiting:
            return []
        free = self.batch_limit - self.in_batch
        candidates = sorted((s for s in self.running if not s.finished), key=_urgency, reverse=True)
        victims: list[Sequence] = []
        for waiting in self.waiting:  # most urgent first
            if free > 0:
                free -= 1
                continue
            if not candidates or _priority(candidates[0]) <= _priority(waiting):
                break  # nothing running is less urgent than this one, nor than any after it
            victims.append(candidates.pop(0))
        if not victims:
            return []
        leaving = set(map(id, victims))
        self.running = [s for s in self.running if id(s) not in leaving]
        self._requeue(victims)
        return victims

    def preempt_all(self) -> list[Sequence]:
        """Out of memory in a decode step: every running sequence back to the queue, ahead of the sequences that
        came after it, and the batch capped at half of them (``memory_cap``)."""
        victims = [s for s in self.running if not s.finished]
        self.running = [s for s in self.running if s.finished]  # retired at the next retire(), as ever
        self.memory_cap = max(1, len(victims) // 2)
        self._good_steps = 0
        self._requeue(victims)
        return victims

    def preempt_least_urgent(self) -> Sequence:
        """The K/V budget cannot hold the next decode step: the least urgent running sequence (the latest to
        arrive, under ``fcfs``) back to the queue, and the batch capped at the sequences left (``memory_cap``)."""
        victim = max((s for s in self.running if not s.finished), key=_urgency)
        self.running = [s for s in self.running if s is not victim]
        self.memory_cap = max(1, sum(not s.finished for s in self.running))
        self._good_steps = 0
        self._requeue([victim])
        return victim

    def defer_prefilling(self, cap: int) -> list[Sequence]:
        """Out of memory in a prefill: the group's sequences back to the queue, ahead of the sequences that came
        after them, unpreempted (they held no K/V in the batch: they will be counted and scored when their prefill
        completes), and the batch capped at ``cap`` (at least one)."""
        deferred = [s for s in self.prefilling if not s.finished]
        self.prefilling = [s for s in self.prefilling if s.finished]
        self.memory_cap = max(1, cap)
        self._good_steps = 0
        for sequence in deferred:
            sequence.defer()
        self._queue_again(deferred)
        return deferred

    def decoded(self) -> None:
        """A decode step went through: under a memory cap, count towards taking one more sequence."""
        if self.memory_cap is None:
            return
        self._good_steps += 1
        if self._good_steps >= MEMORY_GROW_STEPS:
            self._good_steps = 0
            self.memory_cap += 1
            if self.memory_cap >= self.limits.max_num_seqs:
                self.memory_cap = None

    def _requeue(self, victims: list[Sequence]) -> None:
        """Preempted sequences back to waiting (``_queue_again``), counted as preemptions."""
        self.running_version += 1
        self.preemptions_total += len(victims)
        for sequence in victims:
            sequence.preempt()
        self._queue_again(victims)

    def _queue_again(self, sequences: list[Sequence]) -> None:
        """Sequences admitted before back to waiting: by priority then arrival under ``priority``, else ahead of
        every sequence that waits (they were admitted before any of them), in arrival order."""
        if self.limits.scheduling_policy == "priority":
            for sequence in sequences:
                bisect.insort_right(self.waiting, sequence, key=_urgency)
        else:
            self.waiting.extendleft(sorted(sequences, key=lambda s: s.arrival, reverse=True))

    def promote(self, sequences: list[Sequence]) -> None:
        """Prefilled: these leave ``prefilling``; those not finished by their first token join ``running``."""
        leaving = set(map(id, sequences))
        self.prefilling = [s for s in self.prefilling if id(s) not in leaving]
        for sequence in sequences:
            if not sequence.finished:
                sequence.start_running()
                self.running.append(sequence)
                self.running_version += 1

    def remove(self, predicate: Callable[[Sequence], bool]) -> list[Sequence]:
        """Take the sequences ``predicate`` picks out of every list (aborts, timeouts); the caller ends them."""
        removed = [s for s in self.active() if predicate(s)]
        if removed:
            self.waiting = deque(s for s in self.waiting if not predicate(s))
            self.prefilling = [s for s in self.prefilling if not predicate(s)]
            self.running = [s for s in self.running if not predicate(s)]
            self.running_version += 1
        return removed

    def retire(self) -> None:
        """Drop the finished sequences (their last output is out) from ``prefilling`` and ``running``."""
        if any(s.finished for s in self.prefilling):
            self.prefilling = [s for s in self.prefilling if not s.finished]
        if any(s.finished for s in self.running):
            self.running = [s for s in self.running if not s.finished]
            self.running_version += 1
