"""The running batch's K/V in buffers allocated once: what a CUDA graph can capture.

``StaticSlotKVCache`` is a ``SlotKVCache`` (kv_cache.py: one slot per row, a row's tokens at columns
``[0, length)``, a leaving row's slot refilled by the last row) whose per-layer ``[slots, kv_heads, capacity,
head_dim]`` buffers are allocated at start-up, sized by ``plan_slots`` from the engine's KV budget
(``max_num_seqs`` rows of ``max_model_len`` tokens) and the device's free memory, and never move: a graph
captured over them stays valid for the life of the engine. Rows join and leave exactly as in the growable
cache (the bookkeeping is inherited); when the batch empties the buffers are kept, not freed.

A row count or a length past the buffers (never under the engine's limits, unless memory forced fewer slots
than ``max_num_seqs``) regrows them as the growable cache does, with a warning; ``generation`` counts such
moves, and the graphs captured over the old buffers are dropped (decoding goes on eagerly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from proxy_engine.kv_cache import SlotKVCache

log = logging.getLogger("proxy_engine.executor.static_cache")


@dataclass(frozen=True)
class SlotPlan:
    """Static buffers of one model: ``slots`` rows of ``capacity`` tokens (``nbytes`` in all)."""

    slots: int
    capacity: int
    nbytes: int


def plan_slots(bytes_per_token: int, max_rows: int, max_len: int, available: int | None) -> SlotPlan | None:
    """Slots for ``max_rows`` rows of ``max_len`` tokens, or as many as ``available`` bytes hold (None: no limit);
    None when not even one full-length row fits."""
    row = bytes_per_token * max_len
    slots = max_rows if available is None or row == 0 else min(max_rows, available // row)
    if slots < 1:
        return None
    return SlotPlan(slots, max_len, slots * row)


class StaticSlotKVCache(SlotKVCache):
    """A slot cache whose buffers exist from the start and stay put (see the module docstring)."""

    def __init__(self, num_layers: int, plan: SlotPlan, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(num_layers)
        self.plan = plan
        self.generation = 0  # bumped whenever the buffers move (graphs over the old ones are then stale)
        like = torch.empty((1, kv_heads, 1, head_dim), dtype=dtype, device=device)
        with torch.no_grad():  # plain tensors, not inference tensors: rows are copied in outside inference mode
            for layer in self.layers:
                layer.allocate(like, like, plan.slots, plan.capacity)

    def _reserve(self, k_like: torch.Tensor, v_like: torch.Tensor, rows: int, width: int) -> None:
        if rows <= self.slots and width <= self.capacity:
            return
        log.warning("static KV buffers (%d slots x %d tokens) too small for %d rows of %d tokens: regrowing them; "
                    "this model decodes without CUDA graphs from now on", self.slots, self.capacity, rows, width)
        self.generation += 1
        super()._reserve(k_like, v_like, rows, width)

    def clear(self) -> None:
        """No rows (the buffers stay)."""
        self.state.lengths = []
