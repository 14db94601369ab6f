"""One model and the rows it decodes: prefill (chunked), decode one token for every row, drop rows, add rows.

A runner owns a left-padded batch: a ``PaddedKVCache``, the attention mask ``[B, L]`` (1 = real token) and
each row's next position. Rows are keyed by sequence id; the engine keeps every runner's rows in the same
relative order, but a runner may hold only a subset (the small models skip rows whose alpha is 0).

Prefill runs in a ``PrefillJob`` of its own (its own cache), a chunk of columns at a time, so a long prompt
never stalls the running streams for more than one chunk; when it completes, its rows are appended.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from proxy_engine.kv_cache import PaddedKVCache


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], mask [B, L])`` with every row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _merge_masks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack two left-padded masks, left-padding the narrower one."""
    width = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (width - a.shape[1], 0))
    b = torch.nn.functional.pad(b, (width - b.shape[1], 0))
    return torch.cat([a, b], dim=0)


@dataclass(eq=False)
class PrefillJob:
    """Prompts of some new rows, prefilled a chunk of columns at a time."""

    seq_ids: list[int]
    ids: torch.Tensor  # [b, L] left-padded prompt ids
    mask: torch.Tensor  # [b, L]
    cache: PaddedKVCache
    done: int = 0  # columns prefilled so far
    last_logits: torch.Tensor | None = None  # [b, V] float32, once complete
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def complete(self) -> bool:
        return self.done >= self.ids.shape[1]

    @property
    def remaining_tokens(self) -> int:
        return (self.ids.shape[1] - self.done) * len(self.seq_ids)


class ModelRunner:
    """A causal LM with its batch of rows. ``vocab_size`` cuts padded logit rows to the shared vocabulary."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, pad_id: int, name: str) -> None:
        self.model = model
        self.name = name
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.num_layers = model.config.num_hidden_layers
        self.device = model.get_input_embeddings().weight.device
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache; accept either.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = "logits_to_keep" if "logits_to_keep" in params else None
        self._reset()

    def _reset(self) -> None:
        self.cache = PaddedKVCache(self.num_layers)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.seq_ids: list[int] = []
        self.padded = False  # any left padding in the batch? (if not, no attention mask is needed)

    @property
    def num_rows(self) -> int:
        return len(self.seq_ids)

    # --- the forward pass --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: PaddedKVCache):
        """Last-position logits ``[B, V]`` (float32, cut to the vocabulary) for ``ids [B, q]``."""
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if self._keep_kwarg:
            kwargs[self._keep_kwarg] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, : self.vocab_size].float()

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[B]``, in row order) and return next-token logits ``[B, V]``.

        The launch is asynchronous on accelerators: nothing here waits for the device, so the engine can
        launch all models' decodes before it reads any result.
        """
        ids = token_ids.to(self.device, non_blocking=True).view(-1, 1)
        ones = torch.ones((self.num_rows, 1), dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        # Without padding the causal mask is implied: skipping it spares the model a mask build (and, in
        # transformers, a host synchronisation that would serialise the models' launches on a GPU).
        mask = self.mask if self.padded else None
        logits = self._forward(ids, mask, self.positions.view(-1, 1), self.cache)
        self.positions = self.positions + 1
        return logits

    # --- rows in and out ---------------------------------------------------------------------------------
    def start_prefill(self, seq_ids: list[int], prompts: list[list[int]]) -> PrefillJob:
        ids, mask = _left_pad(prompts, self.pad_id)
        job = PrefillJob(seq_ids, ids.to(self.device), mask.to(self.device), PaddedKVCache(self.num_layers))
        job.positions = (job.mask.cumsum(dim=1) - 1).clamp(min=0)
        return job

    def prefill_step(self, job: PrefillJob, max_tokens: int) -> int:
        """Prefill up to ``max_tokens`` (rows x columns) of ``job``; returns the tokens processed."""
        if job.complete:
            return 0
        columns = max(1, min(job.ids.shape[1] - job.done, max_tokens // max(1, len(job.seq_ids))))
        end = job.done + columns
        logits = self._forward(
            job.ids[:, job.done : end], job.mask[:, :end], job.positions[:, job.done : end], job.cache
        )
        job.done = end
        if job.complete:
            job.last_logits = logits
        return columns * len(job.seq_ids)

    def add_rows(self, job: PrefillJob, keep: list[int] | None = None) -> None:
        """Append a completed job's rows (those at indices ``keep`` of the job, by default all)."""
        assert job.complete
        positions = job.mask.sum(dim=1)
        mask, cache = job.mask, job.cache
        seq_ids = job.seq_ids
        if keep is not None and len(keep) != len(job.seq_ids):
            rows = torch.tensor(keep, dtype=torch.long, device=self.device)
            if not keep:
                return
            mask, positions = mask[rows], positions[rows]
            trim = int(mask.any(dim=0).int().argmax())
            mask = mask[:, trim:]
            cache.select(rows, trim)
            seq_ids = [job.seq_ids[i] for i in keep]
        if self.num_rows == 0:
            self.cache, self.mask, self.positions = cache, mask, positions
        else:
            self.cache.append_rows(cache)
            self.mask = _merge_masks(self.mask, mask)
            self.positions = torch.cat([self.positions, positions])
        self.seq_ids = self.seq_ids + list(seq_ids)
        self.padded = not bool(self.mask.all())

    def keep_rows(self, seq_ids: list[int]) -> None:
        """Keep only these sequences (a subset of ours, in our order); trim columns no row needs."""
        if seq_ids == self.seq_ids:
            return
        if not seq_ids:
            self._reset()
            return
        index = {s: i for i, s in enumerate(self.seq_ids)}
        rows = torch.tensor([index[s] for s in seq_ids], dtype=torch.long, device=self.device)
        mask = self.mask[rows]
        trim = int(mask.any(dim=0).int().argmax())
        self.mask = mask[:, trim:]
        self.positions = self.positions[rows]
        self.cache.select(rows, trim)
        self.seq_ids = list(seq_ids)
        self.padded = not bool(self.mask.all())

    def kv_bytes(self) -> int:
        return self.cache.nbytes()
