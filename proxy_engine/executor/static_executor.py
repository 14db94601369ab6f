"""The static-buffer decode of one model: its decoder, its fixed K/V buffers, its CUDA graphs.

``StaticExecutor.decode(token_ids)`` is what ``ModelRunner.decode`` calls on this path. Each step picks the
span bucket of the longest row (``buckets.py``); on CUDA with graphs on it replays the graph of (the batch
bucket of its rows, that span) with the rows padded, else it runs the same step eagerly on exactly its rows
(the CPU, ``enforce_eager``, a bucket the memory budget left out, buffers regrown past their plan).
"""

from __future__ import annotations

import logging

import torch

from proxy_engine.executor import buckets as bucketing
from proxy_engine.executor.buckets import batch_buckets, bucket_for, span_buckets
from proxy_engine.executor.cuda_graphs import CaptureReport, DecodeGraphs
from proxy_engine.executor.static_cache import SlotPlan, StaticSlotKVCache
from proxy_engine.executor.static_decode import StaticDecoder, decode_backends
from proxy_engine.lora import LoraAdapter

log = logging.getLogger("proxy_engine.executor.static_executor")


class StaticExecutor:
    """Static buffers sized by ``plan`` for ``model``; graphs captured at construction unless ``eager``."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, name: str, plan: SlotPlan, *, eager: bool,
                 min_span: int | None = None, adapter: LoraAdapter | None = None) -> None:
        self.name = name
        self.decoder = StaticDecoder(model, vocab_size, plan.capacity, adapter=adapter)
        self.device = self.decoder.device
        self.cache = StaticSlotKVCache(model.config.num_hidden_layers, plan, self.decoder.kv_heads,
                                       self.decoder.head_dim, self.decoder.dtype, self.device)
        self.batch_buckets = batch_buckets(plan.slots)
        self.span_buckets = span_buckets(plan.capacity, min_span or bucketing.MIN_SPAN)
        self._rows = torch.arange(plan.slots, device=self.device)
        self.graphs: DecodeGraphs | None = None
        self.capture_report: CaptureReport | None = None
        self._generation = self.cache.generation
        log.info("%s: static KV buffers %d slots x %d tokens (%.2f GiB), q/k/v and gate/up %s", name, plan.slots,
                 plan.capacity, plan.nbytes / 2**30, "fused" if self.decoder.fused else "separate")
        if not eager and self.device.type == "cuda":
            self._capture()

    def _capture(self) -> None:
        self.graphs = DecodeGraphs(self._graph_step, self.device, self.cache.slots,
                                   lambda: decode_backends(self.device))
        try:
            with torch.inference_mode():
                report = self.graphs.capture(self.batch_buckets, self.span_buckets)
        except Exception:  # noqa: BLE001 - a capture that fails leaves this model decoding eagerly, not down
            log.exception("%s: CUDA graph capture failed; decoding eagerly", self.name)
            self.graphs = None
            return
        self.capture_report = report
        log.info("%s: captured %d CUDA graphs (batch buckets %s x span buckets %s) in %.2fs, graph pool +%.1f MiB%s",
                 self.name, report.graphs, self.batch_buckets, self.span_buckets, report.seconds,
                 report.pool_bytes / 2**20,
                 f"; {len(report.skipped)} left to eager decoding by the memory budget" if report.skipped else "")

    def _graph_step(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, span: int) -> torch.Tensor:
        return self.decoder.step(ids, positions, rows, span, self.cache)

    @property
    def graphed(self) -> bool:
        return self.graphs is not None and bool(self.graphs.captured)

    def buckets(self, rows: int, width: int) -> tuple[int | None, int]:
        """``(batch bucket or None, span)`` of a step of ``rows`` rows whose longest attends ``width`` columns."""
        span = bucket_for(width, self.span_buckets)
        if span is None or span > self.cache.capacity:  # buffers regrown past the plan
            span = width
        return bucket_for(rows, self.batch_buckets), span

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[n]`` host tensor, in slot order); next-token logits ``[n, V]`` (float32).
        On the graph path the logits are a view of the graph's output, valid until the next ``decode``."""
        cache = self.cache
        n, width = cache.num_rows, cache.longest + 1
        cache._reserve(cache.layers[0].k_buf, cache.layers[0].v_buf, n, width)
        if cache.generation != self._generation and self.graphs is not None:
            self.graphs.clear()  # captured over buffers that moved
            self._generation = cache.generation
        rows, span = self.buckets(n, width)
        positions = torch.tensor(cache.lengths, dtype=torch.long)
        captured = self.graphs.find(rows, span) if self.graphs is not None and rows is not None else None
        if captured is not None:
            logits = self.graphs.replay(captured, token_ids, positions)
        else:
            size = rows or n
            padded = torch.zeros((2, size), dtype=torch.long)
            padded[0, :n], padded[1, :n] = token_ids, positions
            padded = padded.to(self.device)
            with decode_backends(self.device):
                logits = self.decoder.step(padded[0], padded[1], self._row_index(size), span, cache)[:n]
        cache.end_decode()
        return logits

    def _row_index(self, n: int) -> torch.Tensor:
        if n > self._rows.shape[0]:
            self._rows = torch.arange(n, device=self.device)
        return self._rows[:n]
