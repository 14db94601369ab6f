"""One model and the rows it decodes: prefill (chunked), decode one token for every row, drop rows, add rows.

A runner owns its running rows in a ``SlotKVCache`` (one slot per row, each row's tokens at columns
``[0, length)``, its next position = its length). Rows are keyed by sequence id; ``seq_ids`` lists them in
slot order, which the engine follows when it hands tokens to ``decode`` and reads its logits (the order can
differ from the engine's running order: a leaving row's slot is refilled by the last row, so nothing else
moves). A runner may hold only a subset of the running sequences (the small models skip rows whose alpha is 0).

Prefill runs in a ``PrefillJob`` of its own (a left-padded ``PaddedKVCache``), a chunk of columns at a time, so
a long prompt never stalls the running streams for more than one chunk; when it completes, its rows' real
columns are copied into free slots.

With a ``PrefixCache`` (prefix_cache.py), a job starts from the cached K/V of its rows' prompt prefixes: each
row's cached columns are copied into the job's cache at that row's own offset (after its left padding), and
the job starts at the first column that some row lacks. Every row has at least its last prompt token computed
(its logits give the first output token). A row may decline reuse (prompt logprobs need every position's
logits). When a job completes, ``cache_prompts`` adds its prompts' full blocks to the cache.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from proxy_engine.attention_masks import DecodeMasks
from proxy_engine.config import RuntimeConfig
from proxy_engine.cpu_tuning import tame_malloc, use_cpu_threads
from proxy_engine.executor import FAST, STATIC, choose_executor
from proxy_engine.executor.static_cache import SlotPlan
from proxy_engine.executor.static_decode import disable_cudnn_attention
from proxy_engine.fast_decode import DecodeRows, FastDecoder
from proxy_engine.kv_budget import KVMemoryBudget
from proxy_engine.kv_cache import PaddedKVCache, SlotKVCache
from proxy_engine.prefix_cache import PrefixCache

if TYPE_CHECKING:
    from proxy_engine.lora import LoraAdapter

log = logging.getLogger("proxy_engine.runner")


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], mask [B, L])`` with every row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@dataclass(eq=False)
class PrefillJob:
    """Prompts of some new rows, prefilled a chunk of columns at a time.

    Sequences with the same prompt (the ``n`` choices of a request, or identical requests) share one row of
    ``ids``: it is prefilled once and copied into each sequence's slot when the job completes.
    """

    seq_ids: list[int]
    row_of: list[int]  # seq_ids[i] reads row row_of[i] of ids / the cache / the logits
    ids: torch.Tensor  # [rows, L] left-padded prompt ids, one row per distinct prompt
    mask: torch.Tensor  # [rows, L]
    cache: PaddedKVCache
    done: int = 0  # columns prefilled so far
    last_logits: torch.Tensor | None = None  # [b, V] float32, once complete
    chunk_logits: torch.Tensor | None = None  # the last chunk's every-position logits of the scored rows
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    prompts: list[tuple[int, ...]] = field(default_factory=list)  # row r's prompt (distinct, in row order)
    salts: list[str | None] = field(default_factory=list)  # row r's prefix-cache salt (rows differ by salt too)
    reused: int = 0  # prompt tokens taken from the prefix cache, over the rows
    reused_rows: dict[int, int] = field(default_factory=dict)  # row -> its prompt tokens from the prefix cache
    padded: bool = True  # some row has pad columns (else prefill passes no mask: the flash path, no mask built)

    @property
    def complete(self) -> bool:
        return self.done >= self.ids.shape[1]

    def cached_tokens(self, seq_id: int) -> int:
        """Sequence ``seq_id``'s prompt tokens that came from the prefix cache."""
        return self.reused_rows.get(self.row_of[self.seq_ids.index(seq_id)], 0)

    def pad(self, row: int) -> int:
        """Leading pad columns of row ``row``."""
        return self.ids.shape[1] - len(self.prompts[row])


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: transformers 5 renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ModelRunner:
    """A causal LM with its batch of rows. ``vocab_size`` cuts padded logit rows to the shared vocabulary;
    ``runtime`` (default: from the environment) holds the CPU and decode-path knobs; ``slot_plan`` sizes the
    static K/V buffers of the static executor (executor/: chosen per model and device); ``max_len``, the longest
    sequence it will hold, lets a sliding-window model whose window it never outgrows decode on the fast paths.

    ``adapter``: a LoRA this runner's rows add (an expert served unmerged over ``model``, which its anti-expert's
    runner runs too: lora.py); ``fast``: that other runner's ``FastDecoder``, shared (one set of fused weights,
    and ``decode_together`` runs both runners' rows in one pass over them)."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        pad_id: int,
        name: str,
        *,
        runtime: RuntimeConfig | None = None,
        prefix_cache: PrefixCache | None = None,
        slot_plan: SlotPlan | None = None,
        max_len: int | None = None,
        adapter: LoraAdapter | None = None,
        fast: FastDecoder | None = None,
        kv_budget: KVMemoryBudget | None = None,
    ) -> None:
        self.model = model
        self.kv_budget = kv_budget  # its device's, shared with the other runners there (kv_budget.py)
        self.adapter = adapter
        if adapter is not None:
            adapter.install()
        self.runtime = runtime or RuntimeConfig()
        self.prefix_cache = prefix_cache
        self.name = name
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.num_layers = model.config.num_hidden_layers
        self.device = model.get_input_embeddings().weight.device
        tame_malloc()
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = cache_kwarg(model)
        self._keep_kwarg = "logits_to_keep" if "logits_to_keep" in params else None
        # Decode steps of the families architecture.py knows skip transformers' module stack: static buffers and
        # CUDA graphs (executor/) or fast_decode.py's step.
        self.executor = choose_executor(model, self.device, self.runtime, slot_plan, name, max_len)
        if self.device.type == "cuda":
            disable_cudnn_attention()
        self._fast = None
        self._static = None
        if self.executor == STATIC:
            from proxy_engine.executor.static_executor import StaticExecutor

            assert slot_plan is not None
            self._static = StaticExecutor(model, vocab_size, name, slot_plan, eager=self.runtime.enforce_eager,
                                          adapter=adapter)
        elif self.executor == FAST:
            self._fast = fast or FastDecoder.for_model(model, vocab_size, name, self.runtime.packed_weights,
                                                       max_len=max_len)
        # Decode through transformers: additive masks with the model's sliding window (see attention_masks.py).
        self._masks = DecodeMasks(model.config, model.get_input_embeddings().weight.dtype)
        self._reset()

    def _reset(self) -> None:
        if self._static is not None:
            self._static.cache.clear()  # the static buffers stay (graphs were captured over them)
            self.cache: SlotKVCache = self._static.cache
        else:
            self.cache = SlotKVCache(self.num_layers, self.kv_budget)
        self.seq_ids: list[int] = []  # in slot order

    @property
    def num_rows(self) -> int:
        return len(self.seq_ids)

    @property
    def fast(self) -> FastDecoder | None:
        """Its fast decode step, when it decodes on the fast path (what a runner over the same model shares)."""
        return self._fast

    # --- the forward pass --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache, every_position: bool = False
    ) -> torch.Tensor:
        """Logits (float32, cut to the vocabulary) for ``ids [B, q]``: ``[B, V]`` for the last position, or
        ``[B, q, V]`` for ``every_position`` (prompt logprobs)."""
        if self.device.type == "cpu":
            use_cpu_threads(self.runtime)
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if self._keep_kwarg:
            kwargs[self._keep_kwarg] = 0 if every_position else 1  # 0: every position
        with self.adapter.applied() if self.adapter is not None else contextlib.nullcontext():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        if every_position:
            return out.logits[:, :, : self.vocab_size].float()
        return out.logits[:, -1, : self.vocab_size].float()

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[B]``, in ``seq_ids`` order) and return next-token logits ``[B, V]``.

        The launch is asynchronous on accelerators: nothing here waits for the device, so the engine can
        launch all models' decodes before it reads any result.
        """
        if self._static is not None:
            return self._static.decode(token_ids)
        ids = token_ids.to(self.device, non_blocking=True).view(-1, 1)
        # Rows of different lengths get a [B, 1, 1, span] key mask (passed as is: transformers builds none);
        # rows of one length need none.
        positions, mask = self.cache.begin_decode(self.device)
        if self._fast is not None:
            if self.device.type == "cpu":
                use_cpu_threads(self.runtime)
            logits = self._fast.decode(ids.view(-1), positions, mask, self.cache, self.adapter)
        else:
            mask = self._masks.build(positions, self.cache.state.span, uniform=mask is None)
            logits = self._forward(ids, mask, positions.view(-1, 1), self.cache)
        self.cache.end_decode()
        return logits

    @staticmethod
    def decode_together(runners: list[ModelRunner], tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """``decode`` for runners that share one ``FastDecoder`` (an anti-expert's and its unmerged LoRA experts'):
        every runner's rows in one pass over the model's weights, each with its own cache and LoRA."""
        fast = runners[0].fast
        assert fast is not None and all(r.fast is fast for r in runners)
        groups = []
        for runner, token_ids in zip(runners, tokens):
            positions, mask = runner.cache.begin_decode(runner.device)
            groups.append(DecodeRows(token_ids.to(runner.device, non_blocking=True).view(-1), positions, mask,
                                     runner.cache, runner.adapter))
        if runners[0].device.type == "cpu":
            use_cpu_threads(runners[0].runtime)
        logits = fast.decode_rows(groups)
        for runner in runners:
            runner.cache.end_decode()
        return logits

    # --- rows in and out ---------------------------------------------------------------------------------
    def start_prefill(
        self, seq_ids: list[int], prompts: list[list[int]], reuse: list[bool] | None = None,
        salts: list[str | None] | None = None,
    ) -> PrefillJob:
        """A job for these sequences' prompts; ``reuse[i]`` False keeps sequence i's prompt from starting on
        cached columns (its row then computes every position); ``salts[i]`` is its prefix-cache salt."""
        salts = salts or [None] * len(prompts)
        distinct: dict[tuple[str | None, tuple[int, ...]], int] = {}
        row_of = [distinct.setdefault((salt, tuple(prompt)), len(distinct)) for salt, prompt in zip(salts, prompts)]
        ids, mask = _left_pad([list(prompt) for _, prompt in distinct], self.pad_id)
        job = PrefillJob(seq_ids, row_of, ids.to(self.device), mask.to(self.device),
                         PaddedKVCache(self.num_layers, self.kv_budget))
        job.positions = (job.mask.cumsum(dim=1) - 1).clamp(min=0)
        job.padded = bool((mask == 0).any())
        job.prompts = [prompt for _, prompt in distinct]
        job.salts = [salt for salt, _ in distinct]
        if self.prefix_cache is not None:
            row_reuse = [True] * len(distinct)
            for i, row in enumerate(row_of):  # a row shared with a scoring sequence is scored, so computed
                row_reuse[row] = row_reuse[row] and (reuse is None or reuse[i])
            try:
                self._start_from_cache(job, row_reuse)
            except (RuntimeError, MemoryError) as error:  # no memory (or budget) for the copied columns: prefill it all
                log.warning("%s: cached prefix not used (%s: %s)", self.name, type(error).__name__, error)
                job.cache, job.done = PaddedKVCache(self.num_layers, self.kv_budget), 0
        return job

    def _start_from_cache(self, job: PrefillJob, row_reuse: list[bool]) -> None:
        """Fill the job's first columns from the prefix cache and start it after them.

        The job starts at ``min(pad + hit)`` over its rows, so a row with a longer hit recomputes the columns
        between that start and the end of its hit (the same values): one forward per chunk for every row.
        """
        cache = self.prefix_cache
        assert cache is not None
        chains = []
        for row, prompt in enumerate(job.prompts):
            chains.append(cache.reusable(prompt, job.salts[row]) if row_reuse[row] else [])
        start = min(job.pad(row) + len(chain) * cache.block_size for row, chain in enumerate(chains))
        pieces, queries = [], []
        for row, chain in enumerate(chains):
            if not row_reuse[row]:
                continue
            used = max(0, start - job.pad(row))
            queries.append((row, len(job.prompts[row]), used))
            if used:
                cache.touch(chain[: -(-used // cache.block_size)])
                pieces.append((row, job.pad(row), [cache.read(chain, layer, used) for layer in range(self.num_layers)]))
        if start > 0:
            job.cache.preload(job.ids.shape[0], job.ids.shape[1], start, pieces)
            job.done = start
        for row, queried, used in queries:  # counted once the columns are in (a failed copy reuses nothing)
            cache.record_query(queried, used)
            job.reused += used
            job.reused_rows[row] = used

    def cache_prompts(self, job: PrefillJob) -> int:
        """Add a complete job's prompts' full blocks to the prefix cache; returns the blocks added."""
        if self.prefix_cache is None or not job.complete:
            return 0
        added = 0
        layers = job.cache.layers
        for row, prompt in enumerate(job.prompts):
            pad = job.pad(row)

            def span(start: int, end: int, row: int = row, pad: int = pad) -> list:
                return [(lay.k_buf[row, :, pad + start : pad + end], lay.v_buf[row, :, pad + start : pad + end])
                        for lay in layers]

            try:
                added += self.prefix_cache.insert(prompt, span, job.salts[row])
            except RuntimeError as error:  # out of memory, most likely: caching is an optimisation
                # A block is linked only once its copy exists, so the cache stays consistent; the requests go on.
                log.warning("%s: prompt not cached (%s: %s)", self.name, type(error).__name__, error)
        return added

    def prefill_step(
        self, job: PrefillJob, max_tokens: int, scored_rows: list[int] | None = None, columns: int | None = None
    ) -> int:
        """Prefill up to ``max_tokens`` (rows x columns) of ``job``, or exactly ``columns`` columns when given
        (0: none this step); returns the tokens processed.

        ``scored_rows`` (rows of ``job.ids``) want the logits of every position of this chunk (prompt
        logprobs): they are left in ``job.chunk_logits`` ``[len(scored_rows), columns, V]``.
        """
        if job.complete:
            return 0
        rows = job.ids.shape[0]
        if columns is None:
            columns = max(1, max_tokens // rows)
        columns = min(job.ids.shape[1] - job.done, columns)
        if columns <= 0:
            return 0
        end = job.done + columns
        logits = self._forward(
            job.ids[:, job.done : end], job.mask[:, :end] if job.padded else None, job.positions[:, job.done : end],
            job.cache,
            every_position=bool(scored_rows),
        )
        if scored_rows:
            job.chunk_logits = logits[torch.tensor(scored_rows, dtype=torch.long, device=logits.device)]
            logits = logits[:, -1]
        job.done = end
        if job.complete:
            job.last_logits = logits
        return columns * rows

    def add_rows(self, job: PrefillJob, keep: list[int] | None = None) -> None:
        """Give the sequences ``job.seq_ids[i]`` for ``i`` in ``keep`` (by default all) new slots, each with a copy
        of its prompt's cache."""
        assert job.complete
        members = list(range(len(job.seq_ids))) if keep is None else list(keep)
        if not members:
            return
        rows = [job.row_of[i] for i in members]
        pads = (job.mask.shape[1] - job.mask.sum(dim=1)).tolist()
        self.cache.add(job.cache, rows, [int(pads[row]) for row in rows])
        self.seq_ids = self.seq_ids + [job.seq_ids[i] for i in members]

    def keep_rows(self, seq_ids: list[int]) -> None:
        """Keep only these sequences (a subset of ours, in any order); the others' slots are freed."""
        keep = set(seq_ids)
        leaving = [slot for slot, seq_id in enumerate(self.seq_ids) if seq_id not in keep]
        if not leaving:
            return
        if len(leaving) == len(self.seq_ids):
            self._reset()  # frees the buffers
            return
        for source, target in self.cache.remove(leaving):
            self.seq_ids[target] = self.seq_ids[source]
        del self.seq_ids[len(self.seq_ids) - len(leaving) :]

    def release(self) -> None:
        """Free what only this runner holds (its model's pair was removed and no row is left): its LoRA's hooks and
        terms, its prefix cache, and its reference to the model (a merged copy is freed with the last one)."""
        assert not self.num_rows
        if self.adapter is not None:
            if self._fast is not None:
                self._fast.forget(self.adapter)
            self.adapter.release()
        if self.prefix_cache is not None:  # its blocks leave a pool it may share with its host
            self.prefix_cache.close()
        self.adapter = self.prefix_cache = self._fast = self._static = None
        self.model = None
        self._reset()  # no static buffers left behind either

    def grows_next_step(self) -> bool:
        """Whether its next decode step regrows its K/V buffers; static buffers never do within a budget (they are
        sized at start)."""
        return self._static is None and self.cache.grows_next_step

    def decode_growth(self, room: int) -> int | None:
        """Bytes of K/V budget the next decode step's regrowth takes with ``room`` left (0: none), None when it
        cannot fit."""
        return self.cache.next_step_bytes(room) if self.grows_next_step() else 0

    def kv_bytes(self) -> int:
        return self.cache.nbytes()

    def kv_tokens(self) -> int:
        """Tokens held for the running rows (their live columns)."""
        return sum(self.cache.lengths)
