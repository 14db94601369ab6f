"""One model's prefix cache: the K/V of prompt blocks, reused by later prompts that start the same way.

A prompt is cut into blocks of ``block_size`` tokens. A block is keyed by its parent block (the one before it)
and its own tokens, so a key names the whole prefix up to the block's end: a lookup walks the chain from the
first block and stops at the first miss, and two prompts share exactly the blocks of their common full-block
prefix. Keys are compared by value (the parent's unique id and the token tuple), so no hash collision can hand
one prompt another's K/V.

Each block holds its K and V per layer (``[kv_heads, block_size, head_dim]`` each, on that layer's device: a
model spread over GPUs keeps each layer's part where the layer runs). Blocks are copies, not views of a
prefill job's buffers, so a job or a batch ending never frees them, an eviction never touches a running row,
and evicting a block frees exactly its bytes. Copying is bound by memory bandwidth, about 1% of the prefill
that produced the K/V. Tried and dropped: one tensor per prompt's new blocks (a segment: one copy instead of
2 x layers per block, but a segment's memory stays until its last block goes, so a shared system prompt
pinned the questions cached after it), and a vLLM-style pool of block slots (its indexed write cost 3x a
plain copy on the CPU).

Eviction is least-recently-used within a byte budget. Every use of a chain touches its blocks from the last
to the first, so a block is always more recent than its descendants and the LRU victim is a leaf: a chain is
shortened from its end, never cut from its start (which would orphan the rest).

A budget (``PrefixPool``) may be shared: the caches of LoRA adapters loaded over a model draw on that model's, as
vLLM's adapters share one block pool, so loading ten adapters does not hold ten budgets. Each cache keeps its own
blocks (an adapter's K/V is not its host's); eviction takes the least recently used block among them all.

The cache is owned by one ``ModelRunner`` and used only from the engine's step thread.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from proxy_engine.attention_masks import FULL, SLIDING
from proxy_engine.config import PrefixCacheConfig
from proxy_engine.device_memory import usable_bytes
from proxy_engine.memory import kv_elements_per_token

log = logging.getLogger("proxy_engine.engine")  # the engine's logger, as before the move
_ROOT = -1  # the parent id of an unsalted prompt's first block (a salted one's parent is its salt string)

# (start, end) -> per layer (k, v), each [kv_heads, end - start, head_dim]: a span of a prompt's K/V.
SpanReader = Callable[[int, int], list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(eq=False)
class Block:
    id: int
    key: tuple[int | str, tuple[int, ...]]  # (parent block id, or the salt for a first block; its token ids)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K and V, [kv_heads, block_size, head_dim] each
    nbytes: int
    children: set[int] = field(default_factory=set)
    used: int = 0  # its pool's clock at its last use: the LRU order across the caches sharing the pool


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why reusing cached prompt K/V could be wrong for ``model`` (None when it is safe).

    Reuse is exact when every layer's state is one K/V pair per token that depends only on the tokens up to it:
    full causal attention, and sliding-window attention too, because this engine's caches (``PaddedKVCache``,
    the slot caches) keep every column and the window lives in the masks (transformers' in prefill, ours in
    decode), so a cached column is the one a cold prefill would compute. Recurrent / state-space / linear-attention
    layers carry a state that is not per token, and are refused.
    """
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if config is None:
        return "the model has no config to check its attention against"
    kinds = set(getattr(config, "layer_types", None) or []) - {FULL, SLIDING}
    if kinds:
        return f"layers other than full or sliding-window attention ({', '.join(sorted(kinds))})"
    if not getattr(config, "is_decoder", True) or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only model"
    if getattr(config, "num_kv_shared_layers", 0):  # their blocks would have no K/V of their own to keep
        return "layers that reuse an earlier layer's keys and values (Gemma-3n)"
    return None


class PrefixPool:
    """A byte budget that prefix caches share; the least recently used block among them is evicted first."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = max(0, int(limit_bytes))
        self.members: list[PrefixCache] = []
        self._clock = itertools.count(1)

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.members)

    def tick(self) -> int:
        return next(self._clock)

    def evict(self, target_bytes: int, sparing: PrefixCache, keep: int) -> None:
        """Evict least-recently-used blocks, from whichever member holds the oldest, until at most
        ``target_bytes`` are held, sparing the ``keep`` most recent blocks of ``sparing`` (the chain it extends)."""
        while self.nbytes > target_bytes:
            candidates = [c for c in self.members if c.num_blocks > (keep if c is sparing else 0)]
            if not candidates:
                return
            min(candidates, key=PrefixCache.oldest_use).evict_oldest()


class PrefixCache:
    """Blocks of prompt K/V of one model, LRU-evicted within ``budget_bytes`` (its pool's, maybe shared)."""

    def __init__(self, block_size: int, budget_bytes: int, name: str = "", pool: PrefixPool | None = None) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self.pool = PrefixPool(budget_bytes) if pool is None else pool
        self.pool.members.append(self)
        self.name = name
        self._blocks: OrderedDict[tuple[int | str, tuple[int, ...]], Block] = OrderedDict()  # oldest use first
        self._by_id: dict[int, Block] = {}
        self._next_id = 0
        self.nbytes = 0
        # Prometheus-style totals, in tokens (as vLLM's prefix_cache_queries / prefix_cache_hits).
        self.queries_total = 0
        self.hits_total = 0
        self.evictions_total = 0  # blocks

    # --- reading ---------------------------------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int:
        return self.pool.limit_bytes

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def usage(self) -> float:
        """Bytes this cache holds over its budget, 0-1."""
        return min(1.0, self.nbytes / self.budget_bytes) if self.budget_bytes else 0.0

    def oldest_use(self) -> int:
        return next(iter(self._blocks.values())).used

    def match(self, tokens: Sequence[int], limit: int | None = None, salt: str | None = None) -> list[Block]:
        """The cached blocks of ``tokens``' longest cached full-block prefix, at most ``limit`` tokens long, among
        the blocks cached with the same ``salt``.

        Touches nothing: ``touch`` the blocks actually used.
        """
        usable = len(tokens) if limit is None else min(limit, len(tokens))
        chain: list[Block] = []
        parent: int | str = _ROOT if salt is None else salt
        size = self.block_size
        for i in range(usable // size):
            block = self._blocks.get((parent, tuple(tokens[i * size : (i + 1) * size])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def reusable(self, prompt: Sequence[int], salt: str | None = None) -> list[Block]:
        """The cached blocks a prefill of ``prompt`` may start on: never the whole prompt, since its last token
        must run through the model for its logits."""
        return self.match(prompt, len(prompt) - 1, salt)

    def touch(self, chain: list[Block]) -> None:
        """Mark a chain as just used: last block first, so each block stays more recent than its children."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)
            block.used = self.pool.tick()

    def record_query(self, queried: int, hit: int) -> None:
        self.queries_total += queried
        self.hits_total += hit

    def read(self, chain: list[Block], layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V of the chain's first ``tokens`` tokens: ``[kv_heads, tokens, head_dim]`` each."""
        parts = chain[: -(-tokens // self.block_size)]
        if len(parts) == 1:
            k, v = parts[0].kv[layer]
        else:
            k = torch.cat([block.kv[layer][0] for block in parts], dim=1)
            v = torch.cat([block.kv[layer][1] for block in parts], dim=1)
        return k[:, :tokens], v[:, :tokens]

    # --- writing ---------------------------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], layers_kv: SpanReader, salt: str | None = None) -> int:
        """Cache ``tokens``' full blocks (those not cached yet) under ``salt``; returns how many blocks were added.

        ``layers_kv(start, end)`` gives the K and V of token columns ``[start, end)``, one ``(k, v)`` pair per
        layer of ``[kv_heads, end - start, head_dim]`` tensors (views are fine: blocks copy what they keep); it
        is called once, for the uncached span only.
        """
        full = len(tokens) // self.block_size
        if full == 0 or self.budget_bytes == 0:
            return 0
        chain = self.match(tokens, salt=salt)
        self.touch(chain)  # the cached part is in use: it must not be evicted to make room for the rest
        new = full - len(chain)
        if new <= 0:
            return 0
        start, end = len(chain) * self.block_size, full * self.block_size
        kv = layers_kv(start, end)
        block_bytes = sum(t.numel() * t.element_size() for pair in kv for t in pair) // new
        room_blocks = self.budget_bytes // block_bytes if block_bytes else 0
        new = min(new, room_blocks - len(chain))  # a prompt longer than the whole budget keeps its head
        if new <= 0:
            return 0
        self.pool.evict(self.budget_bytes - new * block_bytes, sparing=self, keep=len(chain))
        parent: int | str = chain[-1].id if chain else (_ROOT if salt is None else salt)
        size = self.block_size
        added: list[Block] = []
        for i in range(new):
            piece = tuple(tokens[start + i * size : start + (i + 1) * size])
            # A copy of the block's columns: the job's buffers are freed when the job ends.
            columns = slice(i * size, (i + 1) * size)
            block_kv = [(k[:, columns].clone(), v[:, columns].clone()) for k, v in kv]
            block = Block(self._next_id, (parent, piece), block_kv, block_bytes)
            self._next_id += 1
            self._blocks[block.key] = block
            self._by_id[block.id] = block
            if isinstance(parent, int) and parent != _ROOT:  # a first block's parent is the root or its salt
                self._by_id[parent].children.add(block.id)
            self.nbytes += block_bytes
            added.append(block)
            parent = block.id
        self.touch(chain + added)
        return new

    def evict_oldest(self) -> None:
        self._remove_subtree(next(iter(self._blocks.values())))

    def close(self) -> None:
        """Free every block and leave the pool (the model's pair was removed)."""
        while self._blocks:
            self.evict_oldest()
        self.pool.members.remove(self)

    def _remove_subtree(self, block: Block) -> None:
        # LRU order makes the victim a leaf; a subtree is removed whole all the same, so that no block is left
        # behind unreachable.
        for child_id in list(block.children):
            child = self._by_id.get(child_id)
            if child is not None:
                self._remove_subtree(child)
        del self._blocks[block.key]
        del self._by_id[block.id]
        parent = self._by_id.get(block.key[0])
        if parent is not None:
            parent.children.discard(block.id)
        self.nbytes -= block.nbytes
        self.evictions_total += 1



def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """K and V bytes per token over all layers, at the model's compute dtype (0 when the config lacks shapes)."""
    element = torch.empty(0, dtype=getattr(model, "dtype", torch.float32)).element_size()
    return kv_elements_per_token(model.config.to_dict()) * element


FREE_MEMORY_SHARE = 0.2  # of the memory free on the model's device when the engine starts


def budget_bytes(kv_at_limits: int, fraction: float, device: torch.device, utilization: float | None = None) -> int:
    """The cache's budget: ``fraction`` of the model's KV cache at the limits, and never more than
    ``FREE_MEMORY_SHARE`` of what its device has free at start, within ``gpu_memory_utilization`` (the running
    batch's KV and activations need the rest; the limits' KV is a worst case that the deployer may have sized past
    the memory)."""
    budget = int(kv_at_limits * fraction)
    free = usable_bytes(device, utilization)
    return budget if free is None else min(budget, int(free * FREE_MEMORY_SHARE))


def for_model(
    settings: PrefixCacheConfig, model: torch.nn.Module, role: str, kv_at_limits: int,
    utilization: float | None = None, pool: PrefixPool | None = None,
) -> PrefixCache | None:
    """The model's prefix cache, or None when caching is off or the model cannot use it (the log says why); with
    ``pool``, it draws on that budget (an adapter's, on its host's)."""
    if not settings.enabled:
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("%s: prefix caching off (%s)", role, reason)
        return None
    if pool is not None:
        log.info("%s: prefix cache within the %.0f MB its host's draws on", role, pool.limit_bytes / 2**20)
        return PrefixCache(settings.block_size, 0, role, pool)
    device = model.get_input_embeddings().weight.device
    budget = budget_bytes(kv_at_limits, settings.memory_fraction, device, utilization)
    log.info("%s: prefix cache of up to %.0f MB", role, budget / 2**20)
    return PrefixCache(settings.block_size, budget, role)
