"""CUDA graphs of the static decode step: one per (batch bucket, span bucket), captured at start-up.

Why up-front rather than on first use: a capture costs tens of milliseconds of host time and allocates from the
graph pool; done while serving, it would stall every running stream at an unpredictable step and grow memory
after the server said it was ready. At start-up the cost is paid once, logged (time and pool memory), and
bounded: capture stops at ``memory_budget`` bytes of pool growth, and the buckets left out decode eagerly.

Every graph of a device shares one memory pool (``torch.cuda.graph_pool_handle``): the three models replay
one after another on one stream, so their intermediates can reuse the same memory; the largest shapes are
captured first so the smaller ones fit in what they left. A pool is shared only while a graph captured into
it is alive: once its graphs are gone the allocator may keep the pool with blocks still in it (cuBLAS's
workspace for the capture stream is allocated there for good) and a capture that joins it fails an internal
assert, so the next engine in the process (a test, the bench) starts a pool of its own. Captures run on one
capture stream per device (``torch.cuda.graph``'s default stream lives on whichever device was current
first, so a pair on a second GPU would be launched off the captured stream) and warm up on one side stream
per device (cuBLAS keeps a workspace per stream it has seen). Inputs go through a static ``[2, rows]`` buffer per
batch bucket (token ids, positions): a step copies its rows' tokens and positions in with one asynchronous copy
from pinned memory (padding rows: token 0 at position 0, in free slots) and replays; the logits are the
graph's own output tensor, valid until the next replay.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger("proxy_engine.executor.cuda_graphs")

GRAPH_MEMORY_BUDGET = 2 << 30  # pool growth allowed per model's captures, bytes: the stated start-up budget


@dataclass
class _DevicePool:
    """A device's graph memory pool and the graphs captured into it (weakly held: it is shared while one lives)."""

    handle: object
    graphs: weakref.WeakSet = field(default_factory=weakref.WeakSet)


_POOLS: dict[int, _DevicePool] = {}  # device index -> its shared graph memory pool
_STREAMS: dict[int, tuple[object, object]] = {}  # device index -> (warm-up stream, capture stream)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def shared_pool(device: torch.device) -> _DevicePool:
    """The device's pool while a graph captured into it lives, else a new one (see the module docstring)."""
    index = _index(device)
    pool = _POOLS.get(index)
    if pool is None or not pool.graphs:
        pool = _POOLS[index] = _DevicePool(torch.cuda.graph_pool_handle())
    return pool


def capture_streams(device: torch.device) -> tuple[object, object]:
    """``(warm-up stream, capture stream)`` of ``device``, made once and reused by every capture there."""
    index = _index(device)
    if index not in _STREAMS:
        _STREAMS[index] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _STREAMS[index]


@dataclass
class CapturedStep:
    rows: int
    span: int
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [rows, V], written by each replay


@dataclass
class CaptureReport:
    graphs: int
    seconds: float
    pool_bytes: int
    skipped: list[tuple[int, int]]  # (rows, span) left to eager decoding by the memory budget


class DecodeGraphs:
    """The captured steps of one model; ``step(ids, positions, rows, span)`` is the decoder's step bound to its
    cache, ``backends`` the SDPA context it runs under."""

    def __init__(self, step: Callable[..., torch.Tensor], device: torch.device, max_rows: int,
                 backends: Callable[[], object]) -> None:
        self._step = step
        self.device = device
        self.backends = backends
        self.inputs: dict[int, torch.Tensor] = {}  # rows -> [2, rows]: token ids, positions (contiguous)
        self.rows = torch.arange(max_rows, device=device)
        self.captured: dict[tuple[int, int], CapturedStep] = {}

    def capture(self, batch_buckets: list[int], span_buckets: list[int],
                memory_budget: int = GRAPH_MEMORY_BUDGET) -> CaptureReport:
        """Capture every (rows, span) pair, largest first, while the pool grows by less than ``memory_budget``.

        The cache must hold no rows: the captures write token 0 at column 0 of the first slots.
        """
        with torch.cuda.device(self.device):  # captures use the current device's streams
            return self._capture_all(batch_buckets, span_buckets, memory_budget)

    def _capture_all(self, batch_buckets: list[int], span_buckets: list[int], memory_budget: int) -> CaptureReport:
        started = time.perf_counter()
        pool = shared_pool(self.device)
        torch.cuda.synchronize(self.device)
        # What the allocator caches but nothing uses (the weights fusion released, say) would be handed back by
        # the first capture (``torch.cuda.graph`` empties the cache) and read as negative pool growth.
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(self.device)
        skipped: list[tuple[int, int]] = []
        for span in sorted(span_buckets, reverse=True):
            for rows in sorted(batch_buckets, reverse=True):
                if torch.cuda.memory_reserved(self.device) - reserved > memory_budget:
                    skipped.append((rows, span))
                    continue
                self.captured[(rows, span)] = self._capture_one(rows, span, pool)
        torch.cuda.synchronize(self.device)
        return CaptureReport(len(self.captured), time.perf_counter() - started,
                             torch.cuda.memory_reserved(self.device) - reserved, skipped)

    def _inputs(self, rows: int) -> torch.Tensor:
        if rows not in self.inputs:
            self.inputs[rows] = torch.zeros((2, rows), dtype=torch.long, device=self.device)
        return self.inputs[rows]

    def _run(self, rows: int, span: int) -> torch.Tensor:
        inputs = self._inputs(rows)
        with self.backends():
            return self._step(inputs[0], inputs[1], self.rows[:rows], span)

    def _capture_one(self, rows: int, span: int, pool: _DevicePool) -> CapturedStep:
        side, capture = capture_streams(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisation, cuBLAS workspaces
            self._run(rows, span)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool.handle, stream=capture):
            logits = self._run(rows, span)
        pool.graphs.add(graph)
        return CapturedStep(rows, span, graph, logits)

    def find(self, rows: int, span: int) -> CapturedStep | None:
        return self.captured.get((rows, span))

    def replay(self, captured: CapturedStep, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` of ``n = len(ids)`` rows (host tensors) through a graph for at least ``n`` rows."""
        n = ids.shape[0]
        # Pinned, and a new block each step: the copy is asynchronous (the host goes on to launch the next model)
        # and the caching host allocator keeps a block until the copy that reads it has run.
        pinned = self.device.type == "cuda"
        padded = torch.zeros((2, captured.rows), dtype=torch.long, pin_memory=pinned)
        padded[0, :n], padded[1, :n] = ids, positions
        self._inputs(captured.rows).copy_(padded, non_blocking=pinned)  # one host-to-device copy
        captured.graph.replay()
        return captured.logits[:n]

    def clear(self) -> None:
        self.captured.clear()
