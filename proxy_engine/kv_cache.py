"""A left-padded, growable KV cache that rows can leave and join: the batch behind continuous batching.

Every layer keeps ``[rows, kv_heads, capacity, head_dim]`` buffers whose first ``length`` columns are live.
Rows are left-padded to one shared length (their pad columns are masked out by the runner's attention
mask), so a decode step appends one column for the whole batch. Appends write in place into spare capacity
(amortised O(1), unlike ``torch.cat`` per step); finished rows are index-selected out and leading all-pad
columns trimmed; a prefilled group is merged in by left-padding the shorter side.

It plugs into Hugging Face models through transformers' ``Cache`` / ``DynamicLayer`` interface, so any
full-attention causal LM works unchanged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_MIN_CAPACITY = 64


def _grown(capacity: int, needed: int) -> int:
    while capacity < needed:
        capacity = max(_MIN_CAPACITY, capacity * 2)
    return capacity


class PaddedLayer(DynamicLayer):
    """One layer's K/V: ``buffers [B, H, capacity, D]`` of which columns ``[:length]`` are live."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    # --- transformers' interface -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.k_buf is None:
            self.is_initialized = True
            self.device = key_states.device
            capacity = _grown(0, new)
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            self.k_buf = key_states.new_empty(shape)
            self.v_buf = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        elif self.length + new > self.k_buf.shape[-2]:
            self._resize(_grown(self.k_buf.shape[-2], self.length + new))
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

    # --- row management ----------------------------------------------------------------------------------
    def _resize(self, capacity: int) -> None:
        assert self.k_buf is not None and self.v_buf is not None
        k = self.k_buf.new_empty((*self.k_buf.shape[:2], capacity, self.k_buf.shape[-1]))
        v = self.v_buf.new_empty((*self.v_buf.shape[:2], capacity, self.v_buf.shape[-1]))
        k[:, :, : self.length] = self.k_buf[:, :, : self.length]
        v[:, :, : self.length] = self.v_buf[:, :, : self.length]
        self.k_buf, self.v_buf = k, v

    def select(self, rows: torch.Tensor, trim: int) -> None:
        """Keep ``rows`` (in that order) and drop the first ``trim`` columns."""
        if self.k_buf is None:
            return
        rows = rows.to(self.k_buf.device)
        length = self.length - trim
        capacity = _grown(0, length + 1)
        k = self.k_buf.new_empty((len(rows), self.k_buf.shape[1], capacity, self.k_buf.shape[-1]))
        v = self.v_buf.new_empty((len(rows), self.v_buf.shape[1], capacity, self.v_buf.shape[-1]))
        k[:, :, :length] = self.k_buf[rows, :, trim : self.length]
        v[:, :, :length] = self.v_buf[rows, :, trim : self.length]
        self.k_buf, self.v_buf, self.length = k, v, length

    def append_rows(self, other: "PaddedLayer") -> None:
        """Put ``other``'s rows after ours, left-padding whichever side is shorter."""
        if other.k_buf is None:
            return
        if self.k_buf is None or self.k_buf.shape[0] == 0:
            self.k_buf, self.v_buf, self.length = other.k_buf, other.v_buf, other.length
            self.is_initialized, self.device = True, other.device
            return
        length = max(self.length, other.length)
        rows = self.k_buf.shape[0] + other.k_buf.shape[0]
        capacity = _grown(0, length + 1)
        k = self.k_buf.new_zeros((rows, self.k_buf.shape[1], capacity, self.k_buf.shape[-1]))
        v = self.v_buf.new_zeros((rows, self.v_buf.shape[1], capacity, self.v_buf.shape[-1]))
        ours = self.k_buf.shape[0]
        other_k, other_v = other.k_buf.to(k.device), other.v_buf.to(v.device)
        k[:ours, :, length - self.length : length] = self.k_buf[:, :, : self.length]
        v[:ours, :, length - self.length : length] = self.v_buf[:, :, : self.length]
        k[ours:, :, length - other.length : length] = other_k[:, :, : other.length]
        v[ours:, :, length - other.length : length] = other_v[:, :, : other.length]
        self.k_buf, self.v_buf, self.length = k, v, length


class PaddedKVCache(Cache):
    """A transformers ``Cache`` made of ``PaddedLayer``s, one per decoder layer."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[PaddedLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def select(self, rows: torch.Tensor, trim: int = 0) -> None:
        for layer in self.layers:
            layer.select(rows, trim)

    def append_rows(self, other: "PaddedKVCache") -> None:
        for mine, theirs in zip(self.layers, other.layers):
            mine.append_rows(theirs)

    def nbytes(self) -> int:
        return sum(
            layer.k_buf.numel() * layer.k_buf.element_size() * 2 for layer in self.layers if layer.k_buf is not None
        )
