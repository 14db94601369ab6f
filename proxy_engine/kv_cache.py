"""KV caches behind continuous batching: a slot cache for the running batch, a left-padded one for prefill.

``SlotKVCache`` (the running batch): every layer keeps ``[slots, kv_heads, capacity, head_dim]`` buffers; each
row owns one slot and its tokens sit at columns ``[0, length)`` of it. A decode step writes each row's new
column at its own position (one indexed write per layer) and attends over ``[0, longest + 1)`` with a key
mask, so a row joining or leaving never copies the other rows: a joining row's prompt is copied into a free
slot, and a leaving row's slot is refilled with the last row (one row copied). Capacity grows with a
quarter of headroom and is kept while the batch runs (memory stays flat under a steady load); it is freed
when the batch empties. This replaced a left-padded batch that was index-selected and re-padded whenever a row left or
joined: a full copy of every row, which cost a third of the step time at 64 streams with churn.

``PaddedKVCache`` (a prefill job's rows): left-padded, growable ``[rows, kv_heads, capacity, head_dim]``
buffers whose first ``length`` columns are live; the runner's 2-D mask hides the pad columns.

Both plug into Hugging Face models through transformers' ``Cache`` / ``DynamicLayer`` interface, so any
full-attention causal LM works unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer

if TYPE_CHECKING:
    from proxy_engine.kv_budget import KVMemoryBudget

_MIN_CAPACITY = 64


def _grown(capacity: int, needed: int, minimum: int = _MIN_CAPACITY) -> int:
    """Doubling (a prefill job's buffers: short-lived)."""
    while capacity < needed:
        capacity = max(minimum, capacity * 2)
    return capacity


def _rounded(value: int, step: int) -> int:
    return max(step, -(-value // step) * step)


def buffer_bytes(layers) -> int:
    """Bytes of the K and V buffers the layers hold (K and V may differ in width: latent attention).

    Read from other threads too (the stats of an engine run in the server's process), while the step sets a
    layer's K buffer and then its V: each buffer is read once, and a layer half-way through is not counted yet."""
    total = 0
    for layer in layers:
        k, v = layer.k_buf, layer.v_buf
        if k is not None and v is not None:
            total += k.nbytes + v.nbytes
    return total


def slot_shape(rows: int, width: int) -> tuple[int, int]:
    """``(slots, capacity)`` a slot cache grows to for ``rows`` rows of ``width`` columns: a quarter of headroom,
    rounded up (4 slots, 64 columns). A regrowth copies the live rows once, and doubling would leave up to half of
    the buffers unused for as long as the batch runs."""
    return _rounded(rows * 5 // 4, 4), _rounded(width * 5 // 4, _MIN_CAPACITY)


def bare_shape(rows: int, width: int) -> tuple[int, int]:
    """``(slots, capacity)`` with no headroom: what a slot cache falls back to under a K/V budget."""
    return rows, _rounded(width, _MIN_CAPACITY)


def lone_sequence_bytes(tokens: int, bytes_per_token: int) -> int:
    """The least K/V one model must hold for a lone sequence of ``tokens`` tokens under a budget (which takes
    the growth rules' headroom only where it fits): at the hand-over of its prompt, the prefill job's columns
    beside the slot they are copied into."""
    return bytes_per_token * (_rounded(tokens, _MIN_CAPACITY) + _rounded(tokens + 1, _MIN_CAPACITY))


def _growth_bytes(k_like: torch.Tensor, v_like: torch.Tensor, rows: int, capacity: int, old: torch.Tensor | None,
                  old_v: torch.Tensor | None) -> int:
    """Bytes a layer's K and V buffers of ``[rows, H, capacity, D]`` (heads and widths of ``k_like`` / ``v_like``)
    hold beyond the ``old`` ones they replace."""
    new = rows * capacity * (k_like.shape[1] * k_like.shape[-1] * k_like.element_size()
                             + v_like.shape[1] * v_like.shape[-1] * v_like.element_size())
    return new - (0 if old is None else old.nbytes + old_v.nbytes)


class PaddedGrowth:
    """What a prefill job's layers share under a K/V budget: the capacity the first layer to grow chose for
    every layer (each layer grows in turn, inside the forward: a choice per layer would let the first take headroom
    that the last then lacks). Not the layers themselves: no layer -> cache -> layer cycle (see SlotState)."""

    def __init__(self, budget: KVMemoryBudget, num_layers: int) -> None:
        self.budget = budget
        self.num_layers = num_layers
        self.capacity = 0


class PaddedLayer(DynamicLayer):
    """One layer's K/V: ``buffers [B, H, capacity, D]`` of which columns ``[:length]`` are live."""

    def __init__(self, growth: PaddedGrowth | None = None) -> None:
        super().__init__()
        self.length = 0
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.growth = growth

    # --- transformers' interface -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.k_buf is None:
            self.is_initialized = True
            self.device = key_states.device
            capacity = self._affordable(_grown(0, new), new, key_states, value_states)
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            self.k_buf = key_states.new_empty(shape)
            self.v_buf = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        elif self.length + new > self.k_buf.shape[-2]:
            needed = self.length + new
            self._resize(self._affordable(_grown(self.k_buf.shape[-2], needed), needed, self.k_buf, self.v_buf))
        self.k_buf[:, :, self.length : self.length + new] = key_states
        self.v_buf[:, :, self.length : self.length + new] = value_states
        self.length += new
        return self.keys, self.values

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.k_buf is None else self.k_buf[:, :, : self.length]

    @keys.setter
    def keys(self, value) -> None:  # DynamicLayer.__init__/reset assign these; the buffers are the truth.
        pass

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.v_buf is None else self.v_buf[:, :, : self.length]

    @values.setter
    def values(self, value) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.length

    def _affordable(self, capacity: int, needed: int, k_like: torch.Tensor, v_like: torch.Tensor) -> int:
        """``capacity`` columns, or where the budget cannot hold them in every layer the fewest that hold
        ``needed`` (the doubling is headroom, not need); raises ``KVBudgetExceeded`` when not even those fit. The
        first layer to grow chooses; the others follow it."""
        growth = self.growth
        if growth is None:
            return capacity

        def extra(columns: int) -> int:
            return _growth_bytes(k_like, v_like, k_like.shape[0], columns, self.k_buf, self.v_buf)

        if growth.capacity >= needed:  # an earlier layer chose this round's capacity, and checked it for every layer
            return growth.capacity
        tight = _rounded(needed, _MIN_CAPACITY)
        for choice in (capacity, tight):
            if growth.budget.fits(extra(choice) * growth.num_layers):
                growth.capacity = choice
                return choice
        if growth.budget.make_room(extra(tight) * growth.num_layers):
            growth.capacity = tight
            return tight
        growth.budget.reserve(extra(tight) * growth.num_layers)  # KVBudgetExceeded, with the sizes
        growth.capacity = tight
        return tight

    def _resize(self, capacity: int) -> None:
        assert self.k_buf is not None and self.v_buf is not None
        k = self.k_buf.new_empty((*self.k_buf.shape[:2], capacity, self.k_buf.shape[-1]))
        v = self.v_buf.new_empty((*self.v_buf.shape[:2], capacity, self.v_buf.shape[-1]))
        k[:, :, : self.length] = self.k_buf[:, :, : self.length]
        v[:, :, : self.length] = self.v_buf[:, :, : self.length]
        self.k_buf, self.v_buf = k, v


class PaddedKVCache(Cache):
    """A transformers ``Cache`` made of ``PaddedLayer``s, one per decoder layer; growth within ``budget``."""

    def __init__(self, num_layers: int, budget: KVMemoryBudget | None = None) -> None:
        self.growth = None if budget is None else PaddedGrowth(budget, num_layers)
        super().__init__(layers=[PaddedLayer(self.growth) for _ in range(num_layers)])
        if budget is not None:
            budget.track(self)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def preload(self, rows: int, capacity: int, length: int, pieces: list[tuple[int, int, list]]) -> None:
        """Start with columns ``[0, length)`` already filled (a cached prefix), before any forward.

        Each piece ``(row, column, kv)`` writes ``kv[layer] = (k, v)`` (``[kv_heads, n, head_dim]`` each) into
        that row from that column on; the other columns of ``[0, length)`` stay zero (left padding, masked).
        ``capacity`` is the job's full width, so the chunks that follow never regrow the buffers.
        """
        assert pieces and all(layer.k_buf is None for layer in self.layers)
        for index, layer in enumerate(self.layers):
            k0, v0 = pieces[0][2][index]
            if self.growth is not None:
                self.growth.budget.reserve(_growth_bytes(k0[None], v0[None], rows, capacity, None, None))
                self.growth.capacity = capacity
            layer.k_buf = k0.new_zeros((rows, k0.shape[0], capacity, k0.shape[-1]))
            layer.v_buf = v0.new_zeros((rows, v0.shape[0], capacity, v0.shape[-1]))
            for row, column, kv in pieces:
                k, v = kv[index]
                layer.k_buf[row, :, column : column + k.shape[1]] = k
                layer.v_buf[row, :, column : column + v.shape[1]] = v
            layer.length = length
            layer.is_initialized, layer.device = True, k0.device

    def nbytes(self) -> int:
        return buffer_bytes(self.layers)

    def trim(self) -> None:
        """A prefill job's buffers are its prompt's (their doubling is dropped under a budget as they grow)."""


class SlotState:
    """What a decode step's layers share: each slot's length, the rows' write positions, the attended span.

    The layers hold this, not the cache: a layer -> cache -> layer cycle would leave a dropped cache's buffers
    to the cyclic garbage collector (hundreds of MB kept for an unpredictable while; RSS grew by half in a
    test of repeated rounds).
    """

    def __init__(self) -> None:
        self.lengths: list[int] = []  # live tokens per slot (= the next position of that row)
        self.row_index = torch.empty(0, dtype=torch.long)
        self.write_pos = torch.empty(0, dtype=torch.long)
        self.span = 0  # columns attended in the current decode: longest + 1
        self.write_column: int | None = None  # every row's write position when they are all the same
        self.allocations = 0  # bumped whenever a layer's buffers are replaced (what nbytes() is memoised on)

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)


class SlotLayer(DynamicLayer):
    """One layer's K/V for the running batch: ``[slots, H, capacity, D]``; row ``i`` is slot ``i``."""

    def __init__(self, state: SlotState) -> None:
        super().__init__()
        self.state = state
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    # --- transformers' interface -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Decode only: ``key_states [n, H, 1, D]``, written at each row's own position."""
        state = self.state
        n, span = state.num_rows, state.span
        if state.write_column is not None:  # one column for every row: a plain strided copy, no index tensors
            self.k_buf[:n, :, state.write_column] = key_states[:, :, 0]
            self.v_buf[:n, :, state.write_column] = value_states[:, :, 0]
        else:
            rows, columns = state.row_index, state.write_pos
            self.k_buf[rows, :, columns] = key_states[:, :, 0]
            self.v_buf[rows, :, columns] = value_states[:, :, 0]
        return self.k_buf[:n, :, :span], self.v_buf[:n, :, :span]

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.k_buf is None else self.k_buf[: self.state.num_rows, :, : self.state.longest]

    @keys.setter
    def keys(self, value) -> None:
        pass

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.v_buf is None else self.v_buf[: self.state.num_rows, :, : self.state.longest]

    @values.setter
    def values(self, value) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.state.longest

    # --- storage -----------------------------------------------------------------------------------------
    def allocate(self, k_like: torch.Tensor, v_like: torch.Tensor, slots: int, capacity: int) -> None:
        """(Re)allocate ``[slots, H, capacity, D]`` buffers, K shaped like ``k_like [*, H, *, D]`` and V like
        ``v_like`` (their head sizes differ under multi-head latent attention), keeping live data."""
        def shaped(like: torch.Tensor) -> torch.Tensor:
            # Zeros, not garbage: masked columns still meet a zero attention weight, and 0 * NaN would be NaN.
            return like.new_zeros((slots, like.shape[1], capacity, like.shape[-1]))

        k, v = shaped(k_like), shaped(v_like)
        if self.k_buf is not None:
            rows, width = min(self.state.num_rows, slots), min(self.state.longest, capacity)
            k[:rows, :, :width] = self.k_buf[:rows, :, :width]
            v[:rows, :, :width] = self.v_buf[:rows, :, :width]
        self.k_buf, self.v_buf = k, v
        # After the buffers are in place: a count another thread memoised half-way is then never taken as current.
        self.state.allocations += 1
        self.is_initialized, self.device = True, k_like.device


class SlotKVCache(Cache):
    """The running batch's cache: one slot per row, each row's tokens at columns ``[0, length)``.

    The runner calls ``begin_decode`` before a decode forward (it returns the rows' positions and the key mask)
    and ``end_decode`` after it; ``add`` copies prefilled rows into free slots, ``remove`` frees slots.

    Only the layers that write K/V hold buffers (``live``, learnt from the first prefill handed over): Gemma-3n's
    last layers reuse an earlier layer's keys and values and never write their own.
    """

    def __init__(self, num_layers: int, budget: KVMemoryBudget | None = None) -> None:
        self.state = SlotState()
        super().__init__(layers=[SlotLayer(self.state) for _ in range(num_layers)])
        self.live: list[SlotLayer] = list(self.layers)
        self._nbytes = (0, 0)  # (state.allocations, bytes) when last counted
        self.budget = budget  # the device's K/V budget, shared with its other caches (kv_budget.py)
        if budget is not None:
            budget.track(self)

    @property
    def lengths(self) -> list[int]:
        return self.state.lengths

    @property
    def num_rows(self) -> int:
        return self.state.num_rows

    @property
    def longest(self) -> int:
        return self.state.longest

    @property
    def slots(self) -> int:
        """Slots every layer has (layers may differ after an allocation failed part-way)."""
        return min((0 if layer.k_buf is None else layer.k_buf.shape[0] for layer in self.live), default=0)

    @property
    def capacity(self) -> int:
        return min((0 if layer.k_buf is None else layer.k_buf.shape[2] for layer in self.live), default=0)

    def _reserve(self, k_like: torch.Tensor, v_like: torch.Tensor, rows: int, width: int) -> None:
        slots, capacity = self.slots, self.capacity
        if rows <= slots and width <= capacity:
            return
        room = None if self.budget is None else self.budget.limit - self.budget.in_use()
        shape = self._grown_shape(k_like, v_like, rows, width, room)
        bare = bare_shape(rows, width)
        if shape is None and self.budget is not None and not self.budget.make_room(self._growth(k_like, v_like, *bare),
                                                                                   asking=self):
            self.budget.reserve(self._growth(k_like, v_like, *bare))  # KVBudgetExceeded, with the sizes
        new_slots, new_capacity = shape or bare
        for layer in self.live:
            # A layer grown by an earlier attempt that failed part-way (out of memory in a later layer) keeps
            # its buffers: every layer holds the live rows either way, and ``slots`` / ``capacity`` read the
            # smallest layer, so the cache stays consistent whichever layer an allocation fails in.
            if layer.k_buf is not None and layer.k_buf.shape[0] >= new_slots and layer.k_buf.shape[2] >= new_capacity:
                continue
            if layer.k_buf is None:
                layer.allocate(k_like, v_like, new_slots, new_capacity)
            else:
                layer.allocate(layer.k_buf, layer.v_buf, new_slots, new_capacity)

    def _grown_shape(self, k_like: torch.Tensor, v_like: torch.Tensor, rows: int, width: int,
                     room: int | None) -> tuple[int, int] | None:
        """``(slots, capacity)`` to regrow to for ``rows`` rows of ``width`` columns with ``room`` bytes of budget
        left (None: no budget): the growth rule's headroom where it fits, else the fewest slots and columns that
        hold the rows (a regrowth drops the slots of rows that left); None when not even those fit."""
        slots, capacity = self.slots, self.capacity
        grown_slots, grown_capacity = slot_shape(rows, width)
        shape = (slots if rows <= slots else grown_slots, capacity if width <= capacity else grown_capacity)
        if room is None or self._growth(k_like, v_like, *shape) <= room:
            return shape
        bare = bare_shape(rows, width)
        return bare if self._growth(k_like, v_like, *bare) <= room else None

    def trim(self) -> None:
        """Give back the headroom: buffers of exactly the rows and the columns their next step needs, never more
        than they hold now (a K/V budget asks it of the other caches before failing a growth: make_room)."""
        rows, width = self.num_rows, self.longest + 1
        first = self.live[0] if self.live else None
        if rows == 0 or first is None or first.k_buf is None:
            return
        # Only ever smaller: a row at the capacity's edge keeps it (its next step's growth asks the budget).
        slots, capacity = bare_shape(rows, width)
        capacity = min(self.capacity, capacity)
        if slots >= self.slots and capacity >= self.capacity:
            return
        # Asked from inside a prefill's forward too (inference mode): the buffers stay plain tensors, which rows
        # are copied into and out of outside it.
        with torch.inference_mode(False), torch.no_grad():
            for layer in self.live:
                if layer.k_buf is not None:
                    layer.allocate(layer.k_buf, layer.v_buf, slots, capacity)

    @property
    def grows_next_step(self) -> bool:
        """Whether the next decode step regrows the buffers (its rows or their next column do not fit them)."""
        first = self.live[0] if self.live else None
        if first is None or first.k_buf is None:
            return False
        return self.num_rows > self.slots or self.longest + 1 > self.capacity

    def next_step_bytes(self, room: int) -> int | None:
        """Bytes the next decode step's regrowth takes with ``room`` bytes of budget left (0: none), as
        ``begin_decode`` will choose; None when it cannot fit."""
        if not self.grows_next_step:
            return 0
        first = self.live[0]
        shape = self._grown_shape(first.k_buf, first.v_buf, self.num_rows, self.longest + 1, room)
        return None if shape is None else self._growth(first.k_buf, first.v_buf, *shape)

    def _growth(self, k_like: torch.Tensor, v_like: torch.Tensor, slots: int, capacity: int) -> int:
        """Bytes the live layers would hold beyond what they do with buffers of ``slots`` x ``capacity``."""
        total = 0
        for layer in self.live:
            if layer.k_buf is None:
                total += _growth_bytes(k_like, v_like, slots, capacity, None, None)
            elif layer.k_buf.shape[0] < slots or layer.k_buf.shape[2] < capacity:  # as _reserve skips
                total += _growth_bytes(layer.k_buf, layer.v_buf, slots, capacity, layer.k_buf, layer.v_buf)
        return total

    # --- decode --------------------------------------------------------------------------------------------
    def begin_decode(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(positions [n], mask [n, 1, 1, span] or None)`` for one decode step over every row."""
        n = self.num_rows
        longest = self.longest
        if self.layers and self.layers[0].k_buf is not None:
            self._reserve(self.layers[0].k_buf, self.layers[0].v_buf, n, longest + 1)
        state = self.state
        positions = torch.tensor(state.lengths, dtype=torch.long)
        state.write_pos = positions.to(device, non_blocking=True)
        if state.row_index.numel() != n or state.row_index.device != state.write_pos.device:
            state.row_index = torch.arange(n, device=state.write_pos.device)
        state.span = longest + 1
        state.write_column = None
        if all(length == longest for length in state.lengths):
            state.write_column = longest
            return state.write_pos, None  # no row is shorter: the causal mask is implied
        columns = torch.arange(state.span, device=state.write_pos.device)
        mask = columns[None, :] <= state.write_pos[:, None]  # [n, span]: a row sees its tokens and the new one
        return state.write_pos, mask[:, None, None, :]

    def end_decode(self) -> None:
        self.state.lengths = [length + 1 for length in self.state.lengths]
        self.state.write_column = None

    # --- rows in and out -----------------------------------------------------------------------------------
    def add(self, job: PaddedKVCache, rows: list[int], pads: list[int]) -> None:
        """Copy ``job``'s rows (indices ``rows``, each with ``pads[i]`` leading pad columns) into new slots."""
        first = job.layers[0] if job.layers else None
        if first is None or first.k_buf is None or not rows:
            return
        if all(layer.k_buf is None for layer in self.layers):  # the first rows: the layers that write K/V
            self.live = [mine for mine, theirs in zip(self.layers, job.layers) if theirs.k_buf is not None]
        width = first.length
        start = self.num_rows
        lengths = [width - pad for pad in pads]
        self._reserve(first.k_buf, first.v_buf, start + len(rows), max(self.longest, max(lengths)) + 1)
        same = all(pad == pads[0] for pad in pads) and rows == list(range(rows[0], rows[0] + len(rows)))
        for mine, theirs in zip(self.layers, job.layers):
            if theirs.k_buf is None:  # a layer that reuses another's K/V
                continue
            k, v = theirs.k_buf.to(mine.k_buf.device), theirs.v_buf.to(mine.v_buf.device)
            if same:  # one block copy (prompts of one length)
                pad, end = pads[0], start + len(rows)
                mine.k_buf[start:end, :, : width - pad] = k[rows[0] : rows[0] + len(rows), :, pad:width]
                mine.v_buf[start:end, :, : width - pad] = v[rows[0] : rows[0] + len(rows), :, pad:width]
                continue
            for slot, (row, pad) in enumerate(zip(rows, pads), start=start):
                mine.k_buf[slot, :, : width - pad] = k[row, :, pad:width]
                mine.v_buf[slot, :, : width - pad] = v[row, :, pad:width]
        self.state.lengths += lengths

    def remove(self, slots: list[int]) -> list[tuple[int, int]]:
        """Free ``slots``; each hole is refilled with the current last row. Returns the ``(from, to)`` moves."""
        moves = []
        for slot in sorted(slots, reverse=True):
            last = self.num_rows - 1
            if slot != last:
                length = self.lengths[last]
                for layer in self.live:
                    layer.k_buf[slot, :, :length] = layer.k_buf[last, :, :length]
                    layer.v_buf[slot, :, :length] = layer.v_buf[last, :, :length]
                self.lengths[slot] = length
                moves.append((last, slot))
            self.lengths.pop()
        return moves

    def nbytes(self) -> int:
        # Asked every step (the K/V budget, the engine's stats): walked only after the buffers changed.
        if self._nbytes[0] != self.state.allocations:
            self._nbytes = (self.state.allocations, buffer_bytes(self.layers))
        return self._nbytes[1]
