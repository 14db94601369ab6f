"""A ceiling on the K/V memory the growable caches of one device hold together: vLLM's ``--kv-cache-memory-bytes``
(and, for the CPU, its ``VLLM_CPU_KVCACHE_SPACE``).

The running batch's slot caches grow with the batch and its longest row, a prefill job's cache with the prompt
it reads. On a GPU, running out is an exception the engine recovers from (engine.py: the decode batch is preempted
and resumes smaller, a prefill group goes back to the queue). On the CPU it is not: the allocation succeeds, the
pages fill, and the kernel's OOM killer ends the process and every request in it. The budget turns growth past
the ceiling into the same recoverable error, raised before anything is allocated.

Within it, a cache takes its growth rule's headroom (a quarter more slots and columns; a prefill's doubling) only
where that fits, and gives it back (``make_room``) when another cache's bare need would not fit otherwise, so a
sequence as long as ``longest_sequence`` allows always fits on its own.

What counts is what the caches hold once a buffer is regrown (the old one is freed as the new one replaces it:
for that moment both are held, which ``AUTO_CPU_SHARE`` leaves room for). The prefix cache has its own budget
(prefix_cache.py); the static K/V buffers of the CUDA executor are sized at start-up within the GPU's memory.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from proxy_engine.device_memory import free_bytes
from proxy_engine.kv_cache import lone_sequence_bytes
from proxy_engine.memory import GiB, gib

log = logging.getLogger("proxy_engine.kv_budget")

# Of the host RAM available once the weights are in: a regrowth's moment of two buffers and the prefix caches'
# share (prefix_cache.FREE_MEMORY_SHARE) fit beside it.
AUTO_CPU_SHARE = 0.4
CPU_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB, as vLLM's CPU backend reads it


class KVBudgetExceeded(MemoryError):
    """A cache would grow past the K/V budget: an out-of-memory error (device_memory.out_of_memory), raised
    before the allocation."""


class SizedCache(Protocol):
    def nbytes(self) -> int: ...

    def trim(self) -> None: ...


class KVMemoryBudget:
    """The K/V bytes the growable caches on ``device`` may hold together."""

    def __init__(self, limit_bytes: int, device: torch.device, source: str) -> None:
        self.limit = limit_bytes
        self.device = device
        self.source = source  # where the limit comes from, for messages: "--kv-cache-memory", ...
        # Weak: a prefill job's cache leaves the budget when the job is dropped, with nothing to call.
        self._caches: weakref.WeakSet[SizedCache] = weakref.WeakSet()
        # The step thread adds caches and reads the total (engine_stats is read there too); the lock keeps a copy
        # whole should any other thread read it (a set must not change size while it is copied).
        self._lock = threading.Lock()

    def track(self, cache: SizedCache) -> None:
        with self._lock:
            self._caches.add(cache)

    def _tracked(self) -> list[SizedCache]:
        with self._lock:
            return list(self._caches)

    def in_use(self) -> int:
        return sum(cache.nbytes() for cache in self._tracked())

    def fits(self, extra: int) -> bool:
        return extra <= 0 or self.in_use() + extra <= self.limit

    def trim(self, keep: SizedCache | None = None) -> None:
        """Every cache but ``keep`` gives back its headroom (the slots and columns its rows do not need)."""
        for cache in self._tracked():
            if cache is not keep:
                cache.trim()

    def make_room(self, extra: int, asking: SizedCache | None = None) -> bool:
        """Whether ``extra`` more bytes fit, once the other caches have given back their headroom if they must: the
        first cache to grow may have taken headroom that a later one's bare need then lacks (the base's slots
        before the pair's, at a hand-over)."""
        if self.fits(extra):
            return True
        self.trim(keep=asking)
        return self.fits(extra)

    def reserve(self, extra: int) -> None:
        """Raise ``KVBudgetExceeded`` unless the caches may hold ``extra`` more bytes than they do."""
        if extra <= 0:
            return
        used = self.in_use()
        if used + extra > self.limit:
            raise KVBudgetExceeded(
                f"the K/V caches on {self.device} would hold {gib(used + extra)} GiB, over its {gib(self.limit)} GiB "
                f"K/V budget ({self.source})"
            )


def budget_limit(device: torch.device, configured: int | None,
                 available: Callable[[], int | None]) -> tuple[int, str] | None:
    """``(bytes, where they come from)`` of ``device``'s budget: ``configured`` when set (on every device); else, on
    the CPU, ``VLLM_CPU_KVCACHE_SPACE`` GiB when set, or ``AUTO_CPU_SHARE`` of ``available()`` (the RAM available
    once the weights are in); else None (a GPU's allocator raises a recoverable error of its own)."""
    if configured is not None:
        return configured, "--kv-cache-memory"
    if device.type != "cpu":
        return None
    space = os.environ.get(CPU_SPACE_ENV, "").strip()
    if space and float(space) > 0:  # vLLM reads 0 as "choose for me"
        return int(float(space) * GiB), CPU_SPACE_ENV
    free = available()
    if free is None:
        return None
    return int(free * AUTO_CPU_SHARE), (f"{AUTO_CPU_SHARE:.0%} of the RAM available after the weights; "
                                        "--kv-cache-memory sets it")


def budget_for(device: torch.device, configured: int | None) -> KVMemoryBudget | None:
    """The budget of ``device``'s growable caches (``budget_limit``), the RAM available read now: call it once the
    weights are loaded."""
    limit = budget_limit(device, configured, lambda: free_bytes(device))
    return None if limit is None else KVMemoryBudget(limit[0], device, limit[1])


def longest_sequence(limit: int, bytes_per_token: list[int], max_lens: list[int]) -> int:
    """The most tokens one sequence may reach when the K/V of the models (``bytes_per_token`` each, up to their
    ``max_lens``) must fit ``limit`` bytes together: 0 when not even one token fits."""
    def need(tokens: int) -> int:
        return sum(lone_sequence_bytes(min(tokens, cap), per) for per, cap in zip(bytes_per_token, max_lens))

    low, high = 0, max(max_lens, default=0)
    while low < high:  # need() grows with tokens: the largest that fits
        middle = (low + high + 1) // 2
        if need(middle) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


MIN_SEQUENCE_TOKENS = 64  # a budget that holds less than this for one sequence is a mistake, not a limit


@dataclass(frozen=True)
class ShortContext:
    """One sequence of the context wanted does not fit a device's budget: ``longest`` tokens do."""

    longest: int
    problem: str  # what does not fit, for a log line or --check
    refused: bool  # the deployer set max_model_len, or under MIN_SEQUENCE_TOKENS fit: a start-up error, not a warning

    @property
    def error(self) -> str:
        return f"{self.problem}: raise --kv-cache-memory or lower --max-model-len"


def short_context(device: str, limit: int, source: str, bytes_per_token: list[int], max_lens: list[int],
                  max_model_len_set: bool) -> ShortContext | None:
    """None when one sequence as long as the longest of ``max_lens`` fits ``limit`` bytes of K/V with the models on
    ``device`` (``bytes_per_token`` each, up to their ``max_lens``); else what does. The engine (``fitted_max_lens``)
    and ``--check`` (placement.py) judge a context by this one rule."""
    wanted = max(max_lens, default=0)
    longest = longest_sequence(limit, bytes_per_token, max_lens)
    if longest >= wanted:
        return None
    problem = (f"one sequence of {wanted} tokens needs more K/V on {device} than its {gib(limit)} GiB K/V budget "
               f"({source}) holds ({longest} tokens fit)")
    return ShortContext(longest, problem, max_model_len_set or longest < MIN_SEQUENCE_TOKENS)


def fitted_max_lens(budgets: dict[str, KVMemoryBudget | None], devices: list[str], bytes_per_token: list[int],
                    max_lens: list[int], max_model_len_set: bool) -> list[int]:
    """Each model's ``max_lens`` entry, lowered where one sequence that long would not fit its device's budget
    (vLLM refuses such a start; we serve the shorter context, with a warning, unless ``max_model_len`` was set).
    Raises ValueError when the deployer set the length, or when under ``MIN_SEQUENCE_TOKENS`` fit."""
    fitted = list(max_lens)
    for device, budget in budgets.items():
        on = [i for i, d in enumerate(devices) if d == device]
        if budget is None or not on:
            continue
        short = short_context(device, budget.limit, budget.source, [bytes_per_token[i] for i in on],
                              [fitted[i] for i in on], max_model_len_set)
        if short is None:
            continue
        if short.refused:
            raise ValueError(short.error)
        log.warning("%s: a sequence may reach %d tokens (--max-model-len sets it, --kv-cache-memory the budget)",
                    short.problem, short.longest)
        fitted = [min(length, short.longest) for length in fitted]
    return fitted
