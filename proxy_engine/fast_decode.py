"""A decode step for the decoder-only families of ``architecture.py``, on the model's own weights, without its
module stack.

transformers' forward costs a fixed amount of Python per layer (module calls, keyword plumbing, decorators,
mask and cache dispatch) whatever the batch: for the small expert / anti-expert it was most of their decode
time (a 4-layer, 3.7M-parameter model: 2.0 ms per step at one row, 1.2 ms with this path), and 5-8% of
the base's. Prefill, and every architecture not recognised here, still run through transformers.

The math is the model's, op for op, as architecture.py reads it (Llama, Mistral, Qwen2 / Qwen3, Gemma / Gemma-2 /
Gemma-3): its RMSNorms (Llama's or Gemma's, two or four per layer, per-head query / key norms), rotary embeddings
from the model's own rotary module (every RoPE scaling type; Gemma-3's local base), SDPA with the module's
scaling (grouped-query heads included) or, under Gemma-2's soft-cap, the eager attention it implies, a sliding
window where a layer has one, the gated MLP with the model's activation or the model's own mixture-of-experts
block in its place (Mixtral, Qwen2/3-MoE, OLMoE), the final norm (and soft-cap) and the head cut to the shared
vocabulary. The weights are not copied.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from proxy_engine.architecture import DecoderLayout, Norm, length_dependent_rope, unsupported_reason
from proxy_engine.attention_masks import FULL, SLIDING, visible
from proxy_engine.config import PACKED_WEIGHTS_ENV
from proxy_engine.lora import LoraTerm, layer_terms

if TYPE_CHECKING:
    from proxy_engine.lora import LoraAdapter

log = logging.getLogger("proxy_engine.fast_decode")

PACKED_MIN_ROWS = 4  # below this many rows the plain (row-major) GEMM is as fast or faster
_PACKED_MEMORY_SHARE = 0.1  # unset: pack when the copies take at most this share of physical memory

def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: float32 statistics, then the weight in the input dtype."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32:
        # The same float32 arithmetic in one call (bit-identical here): 9.5 against 14.6 us per [1, 576] row,
        # and a step has two per layer.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def upcast_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's and OLMo's RMSNorm: float32 statistics times ``weight`` (float32: Gemma's ``1 + w``, OLMo's
    ``w``), then the input dtype."""
    return F.rms_norm(x.to(torch.float32), (x.shape[-1],), weight, eps).to(x.dtype)


def apply_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """``norm`` (architecture.py) on ``x [..., hidden]``."""
    return upcast_norm(x, norm.weight, norm.eps) if norm.upcast else _norm(x, norm.weight, norm.eps)


def maybe_norm(x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
    """``apply_norm`` where the layout has the norm; ``x`` as is where it has none (OLMo's missing pre-norms)."""
    return x if norm is None else apply_norm(x, norm)


def branch_output(h: torch.Tensor, out_norm: Norm | None, scale: float | None) -> torch.Tensor:
    """A sub-block's output as the residual stream takes it: normed (Gemma-2/3, OLMo), scaled (Granite)."""
    if out_norm is not None:
        h = apply_norm(h, out_norm)
    return h if scale is None else h * scale


def routed_mlp(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A mixture-of-experts block (transformers' own: router, experts, a shared expert) on ``h [n, H]``."""
    out = block(h[:, None, :])
    return (out[0] if isinstance(out, tuple) else out).squeeze(1)


def proj_norms(qk: torch.Tensor, norms: tuple[Norm, Norm], q_size: int) -> torch.Tensor:
    """OLMo's query and key norms, each over its whole projection, on ``qk [n, q_size + kv_size]``."""
    return torch.cat((apply_norm(qk[:, :q_size], norms[0]), apply_norm(qk[:, q_size:], norms[1])), dim=-1)


def head_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The query / key RMSNorm of ``x [n, heads, D]``, every head at once: ``norm.weight [heads, D]`` holds each
    head's weight (``architecture.head_norm_of``); float32 statistics, then Llama's or Gemma's weighting."""
    normed = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=norm.eps)
    if norm.upcast:
        return (normed * norm.weight).to(x.dtype)
    return norm.weight * normed.to(x.dtype)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma-2's soft-cap: ``cap * tanh(x / cap)``, in ``x``'s dtype (attention scores, final logits)."""
    return torch.tanh(x / cap) * cap


def softcapped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, cap: float) -> torch.Tensor:
    """Eager attention with Gemma-2's logit soft-cap (``cap * tanh(scores / cap)`` before the mask; SDPA has no
    such step): ``q [n, kv_heads, group, D]`` against ``keys, values [n, kv_heads, span, D]``; ``mask``
    ``[n, 1, 1, span]`` boolean (True: seen) or additive. The softmax in float32, as transformers'."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = softcap(scores, cap)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` without its negation (moved into the sine table: ``RotaryTable.signed``)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


BAG_MAX_OUTPUTS = 640  # one-row GEMVs with at most this many outputs run as a weighted embedding bag


class BagGemv:
    """``x [1, K] @ W`` for a column-major weight (``W^T`` stored ``[K, N]`` contiguous), as a weighted sum of
    the rows of ``W^T``: ``embedding_bag(arange(K), W^T, per_sample_weights=x)``.

    On the CPU that runs fbgemm's embedding kernel, which streams the rows with software prefetching: on the
    real SmolLM2-135M's shapes, one row, one thread, weights cold (as in a step, 540 MB per token), it read
    24.8 GB/s against MKL's GEMV's 13.4 for o_proj (``[576, 576]``) and 17.8 against 11 for down_proj
    (``[1536, 576]``), but lost at 960 outputs and more (12.6 against 15.4 for q/k/v, 11 against 22 for the
    head), and the bench family's base (768 outputs) stepped 16% slower with bags on o / down: hence
    ``BAG_MAX_OUTPUTS``. One bag runs on one thread: with a team of two, MKL's GEMV splits and wins
    (``FastDecoder.linears_for``). The same products summed in another order (float32 rounding only).
    """

    __slots__ = ("bias", "index", "offsets", "table")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.table = weight.t()  # [K, N], contiguous for a column-major weight
        self.index = torch.arange(self.table.shape[0], device=weight.device)
        self.offsets = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.bias = bias

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        """A column-major float32 CPU weight with few enough outputs."""
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.t().is_contiguous()
                and weight.shape[0] <= BAG_MAX_OUTPUTS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = F.embedding_bag(self.index, self.table, self.offsets, mode="sum", per_sample_weights=x[0])
        return out if self.bias is None else out + self.bias


class PackedLinear:
    """``y = x W^T + b`` on a oneDNN pre-packed copy of ``W`` (used from ``PACKED_MIN_ROWS`` rows on).

    On the CPU, MKL's float32 GEMM on a row-major ``[N, K]`` weight is slow for a handful of rows (4-64: the
    decode batch); the same weight reordered once into oneDNN's blocked layout cut the decode step by 7-8%
    at 16 rows (more with q/k/v and gate/up fused into one packed GEMM each), but was 18% slower at one row,
    so one to three rows keep the plain GEMM on the model's own weights. The packed copies double the memory
    of the linear weights: see ``packing_allowed``.
    """

    __slots__ = ("bias", "packed")

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> None:
        weight = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
        if all(b is None for b in biases):
            self.bias = None
        else:
            parts = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
            self.bias = torch.cat(parts).detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_allowed(model: torch.nn.Module, name: str, setting: bool | None = None) -> bool:
    """Whether to keep oneDNN-packed copies of the linear weights (CPU, float32, and memory to spare).

    ``setting`` (``RuntimeConfig.packed_weights``): False never, True always, None when the copies are small.
    """
    weight = model.lm_head.weight
    if setting is False or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if setting:
        return True
    size = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    if size > _PACKED_MEMORY_SHARE * memory:
        log.info("%s: no packed weight copies (%.1f GB would exceed %.0f%% of memory; %s=1 forces them)", name,
                 size / 1e9, _PACKED_MEMORY_SHARE * 100, PACKED_WEIGHTS_ENV)
        return False
    return True


def fuse_linears(linears: list[torch.nn.Linear], column_major: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Move the weights of ``linears`` (same input size) into one storage and return ``(weight [N, K], bias)``,
    the concatenated weight (a view of that storage) and bias (None when no linear has one).

    Each linear's own ``weight`` becomes a view into the shared storage (the same values, no second copy), so
    transformers' forward (prefill) still works on them. ``column_major`` stores the block as ``[K, N]``: a
    one-row GEMV reads it 1.5-4x faster than a row-major ``[N, K]`` (bench/NOTES.md).
    """
    weights = [lin.weight.detach() for lin in linears]
    if column_major:
        storage = torch.cat([w.t() for w in weights], dim=1)  # [K, N] contiguous
        fused = storage.t()
    else:
        fused = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights)
    start = 0
    for lin, weight in zip(linears, weights):
        lin.weight.data = fused[start : start + weight.shape[0]]
        start += weight.shape[0]
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return fused, None
    parts = [b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
    return fused, torch.cat(parts)


def column_major_head(model: torch.nn.Module) -> None:
    """Store the output head (and the input embedding when they are tied) column-major: see ``fuse_linears``."""
    weight = model.lm_head.weight
    weight.data = weight.detach().t().contiguous().t()


class RotaryTable:
    """cos / sin of the model's rotary embedding for positions ``[0, size)``, computed once and indexed per step.

    The values are ``rotary_emb``'s own, position by position (an outer product and elementwise ops), so a
    lookup gives what the per-step call would. Scaling types that depend on the sequence length ("dynamic",
    "longrope") are recomputed every step instead.
    """

    _STATIC = 1024

    def __init__(self, rotary: Callable, like: torch.Tensor, rope_type: str | None = None) -> None:
        """``rotary(x, position_ids) -> (cos, sin)``: the model's rotary module (or one bound to a layer type);
        ``rope_type`` defaults to the module's."""
        self.rotary = rotary
        self.like = like[:1]  # dtype and device
        rope_type = rope_type if rope_type is not None else getattr(rotary, "rope_type", "default")
        self.static = not length_dependent_rope(str(rope_type))
        self.cos = self.sin = self.signed = like.new_empty(0)

    def __call__(self, positions: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin) [n, 1, D]`` for ``positions [n]``; ``longest`` bounds the positions."""
        if not self.static:
            cos, sin = self.rotary(self.like.expand(positions.shape[0], -1)[:, None], positions.view(-1, 1))
            return cos, sin
        if longest >= self.cos.shape[0]:
            size = max(self._STATIC, 1 << longest.bit_length())
            grid = torch.arange(size, device=self.like.device)[None]
            cos, sin = self.rotary(self.like[:, None], grid)  # [1, size, D]
            self.cos, self.sin = cos[0], sin[0]
            half = self.sin.shape[-1] // 2
            self.signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)
        return self.cos[positions][:, None], self.sin[positions][:, None]

    def signed_sin(self, positions: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, signed_sin)``, ``signed_sin`` the sine with its first half negated: ``x * cos +
        swap_halves(x) * signed_sin`` is ``rotate``, in one ``cat`` and one ``addcmul``."""
        cos, sin = self(positions, longest)
        if not self.static:
            half = sin.shape[-1] // 2
            return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos, self.signed[positions][:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (transformers' ``apply_rotary_pos_emb``) for ``x [n, heads, D]``."""
    return x * cos + _rotate_half(x) * sin


def rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``rotate`` with the negation in the table: ``rotate_half(x) * sin == swap_halves(x) * signed_sin``
    exactly (a sign flip); three kernels instead of six. ``addcmul`` may fuse its multiply-add (an FMA: one
    rounding instead of two), so values can differ from ``rotate`` in the last bit."""
    return torch.addcmul(x * cos, _swap_halves(x), signed_sin)


@dataclass(frozen=True)
class DecodeRows:
    """One runner's rows in a step: their last tokens, positions, key mask (or None) and cache, and the LoRA its
    rows add (an expert served unmerged over this model: lora.py), if any."""

    ids: torch.Tensor  # [n]
    positions: torch.Tensor  # [n]
    mask: torch.Tensor | None  # [n, 1, 1, span] bool
    cache: object  # SlotKVCache
    adapter: LoraAdapter | None = None


_FUSED = ("qkv", "o", "gate_up", "down")


class FastDecoder:
    """``decode(ids, positions, mask, cache)`` for one model: next-token logits ``[n, V]`` in float32;
    ``decode_rows`` for the rows of several runners over this one model (an anti-expert's and its LoRA experts'),
    each with its own cache, in one pass over the weights.

    q/k/v and gate/up are fused (one GEMM each: their weights are moved into one storage per layer, see
    ``fuse_linears``), rotary cos / sin come from a table, q and k are rotated together. ``column_major``
    (CPU float32) stores the linear weights column-major for the one-row GEMV; a one-row step on a one-thread
    team then runs the narrow ones (o, down) as embedding bags (``BagGemv``), and steps of ``PACKED_MIN_ROWS``
    rows or more use the packed copies when there are any (``linears_for``).
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, pack: bool = False, column_major: bool = False,
                 max_len: int | None = None) -> None:
        inner = model.model
        self.layout = DecoderLayout(model, max_len)
        self.embed = inner.embed_tokens.weight
        self.layers = list(inner.layers)
        if column_major:
            column_major_head(model)
        self.fused: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []
        for layer, lay in zip(self.layers, self.layout.layers):
            attn, mlp = layer.self_attn, layer.mlp
            fused = {
                "qkv": fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj], column_major),
                "o": fuse_linears([attn.o_proj], column_major),
            }
            if lay.routed is None:  # a routed layer's block runs as transformers runs it (routed_mlp)
                fused["gate_up"] = fuse_linears([mlp.gate_proj, mlp.up_proj], column_major)
                fused["down"] = fuse_linears([mlp.down_proj], column_major)
            self.fused.append(fused)
        self.rotary = {kind: RotaryTable(rotary, self.embed, rope_type)
                       for kind, (rotary, rope_type) in self.layout.rotary.items()}
        # One-row steps on a one-thread team run the narrow column-major GEMVs (o, down) as embedding bags.
        self.bags: list[dict[str, BagGemv]] = [
            {name: BagGemv(w, b) for name, (w, b) in fused.items() if BagGemv.fits(w)} for fused in self.fused]

        self.head_weight = model.lm_head.weight[:vocab_size]  # rows past the shared vocabulary: never computed
        self.head_bias = None if model.lm_head.bias is None else model.lm_head.bias[:vocab_size]
        self.packed: list[dict[str, PackedLinear]] | None = None
        self.packed_head: PackedLinear | None = None
        if pack:
            self.packed = [{name: PackedLinear([w], [b]) for name, (w, b) in fused.items()} for fused in self.fused]
            self.packed_head = PackedLinear([self.head_weight], [self.head_bias])
        # The step's per-layer callables, bound once (the loop then does no lookups): the plain GEMMs on the fused
        # weights, the same with the one-row bags where they fit, and the packed GEMMs.
        plain = [tuple(partial(F.linear, weight=f[name][0], bias=f[name][1]) if name in f else None
                       for name in ("qkv", "o", "gate_up", "down")) for f in self.fused]
        self.plain_linears = plain
        self.bag_linears = [tuple(bags.get(name, fn) for name, fn in zip(("qkv", "o", "gate_up", "down"), fns))
                            for bags, fns in zip(self.bags, plain)]
        self.packed_linears = None if self.packed is None else [
            tuple(p.get(name) for name in ("qkv", "o", "gate_up", "down")) for p in self.packed]
        layout = self.layout
        self.heads, self.kv_heads, self.head_dim = layout.heads, layout.kv_heads, layout.head_dim
        self._lora: dict[int, list[dict[str, LoraTerm | None]]] = {}  # id(adapter) -> per layer, per fused name

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, vocab_size: int, name: str, packed: bool | None = None,
        column_major: bool | None = None, max_len: int | None = None,
    ) -> FastDecoder | None:
        """The fast decoder of ``model``, or None when its architecture is not supported; ``packed`` as in
        ``packing_allowed``; ``column_major`` None: on the CPU in float32; ``max_len`` the longest sequence."""
        reason = unsupported_reason(model, max_len)
        if reason is not None:
            log.info("%s decodes through transformers: %s", name, reason)
            return None
        pack = packing_allowed(model, name, packed)
        if column_major is None:
            weight = model.lm_head.weight
            column_major = weight.device.type == "cpu" and weight.dtype == torch.float32
        try:
            return cls(model, vocab_size, pack, column_major, max_len)
        except RuntimeError as error:  # a oneDNN build that cannot reorder: the plain GEMM everywhere
            if not pack:
                raise
            log.warning("%s: packing the linear weights failed (%s); using the plain GEMM", name, error)
            return cls(model, vocab_size, False, column_major, max_len)

    def linears_for(self, rows: int) -> list:
        """The per-layer (qkv, o, gate_up, down) callables for a step of ``rows`` rows, in the calling thread.

        The bags only for one row on a one-thread team: an embedding bag of one bag runs on one thread, while
        MKL's GEMV splits across the team, so with two threads the bags made the real SmolLM2-135M's one-row
        step 1.25x slower (25.6 against 31.9 ms, quiet machine). With one thread they were within a few
        percent of MKL either way (-3.5 to -8% of the step on a loaded machine, +2 to +4% on a quiet one).
        """
        if self.packed_linears is not None and rows >= PACKED_MIN_ROWS:
            return self.packed_linears
        if rows == 1 and torch.get_num_threads() == 1:
            return self.bag_linears
        return self.plain_linears

    def forget(self, adapter: LoraAdapter) -> None:
        """Drop ``adapter``'s fused terms (it was unloaded)."""
        self._lora.pop(id(adapter), None)

    def lora_terms(self, adapter: LoraAdapter) -> list[dict[str, LoraTerm | None]]:
        """``adapter``'s terms on this decoder's fused projections, per layer (built once per adapter)."""
        terms = self._lora.get(id(adapter))
        if terms is None:
            terms = self._lora[id(adapter)] = layer_terms(adapter, self.layers)
        return terms

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache,
               adapter: LoraAdapter | None = None) -> torch.Tensor:
        """``ids [n]``, ``positions [n]``, ``mask [n, 1, 1, span]`` (bool) or None, ``cache`` a ``SlotKVCache``;
        ``adapter`` a LoRA the rows add. Layers with a sliding window build their own mask from the positions, and
        read only the columns some row's window reaches (from the shortest row's first one): for Gemma-3's local
        layers, a window of hundreds of tokens instead of the whole context."""
        return self.decode_rows([DecodeRows(ids, positions, mask, cache, adapter)])[0]

    @torch.inference_mode()
    def decode_rows(self, groups: list[DecodeRows]) -> list[torch.Tensor]:
        """Next-token logits for each group's rows. The groups' rows go through each projection together (the
        weights are read once for all of them), each group adding its LoRA's terms to its own rows; attention
        reads each group's own cache."""
        layout = self.layout
        ids = groups[0].ids if len(groups) == 1 else torch.cat([g.ids for g in groups])
        n = ids.shape[0]
        bounds, start = [], 0
        for group in groups:
            bounds.append(slice(start, start + group.ids.shape[0]))
            start += group.ids.shape[0]
        if len(groups) == 1:
            bounds = [slice(None)]
        x = F.embedding(ids, self.embed)  # [n, hidden]
        if layout.embed_scale is not None:
            x = x * layout.embed_scale
        attention = [self._attention_inputs(g) for g in groups]
        lora = [None if g.adapter is None else self.lora_terms(g.adapter) for g in groups]
        adapted = [(rows, terms) for rows, terms in zip(bounds, lora) if terms is not None]
        linears = self.linears_for(n)
        packed = linears is self.packed_linears  # the head follows the layers' choice
        for index, ((qkv_proj, o_proj, gate_up_proj, down_proj), lay) in enumerate(zip(linears, layout.layers)):
            h = maybe_norm(x, lay.attn_norm)
            qkv = with_terms(qkv_proj(h), h, adapted, index, "qkv")
            if len(groups) == 1:
                out = self._attend(lay, qkv, attention[0], groups[0].cache.layers[index])
            else:
                out = torch.cat([self._attend(lay, qkv[rows], inputs, group.cache.layers[index])
                                 for rows, inputs, group in zip(bounds, attention, groups)])
            x = x + branch_output(with_terms(o_proj(out), out, adapted, index, "o"), lay.attn_out_norm,
                                  lay.residual_scale)
            h = maybe_norm(x, lay.mlp_norm)
            if lay.routed is None:
                gate, up = with_terms(gate_up_proj(h), h, adapted, index, "gate_up").chunk(2, dim=-1)
                h = lay.act(gate) * up
                h = with_terms(down_proj(h), h, adapted, index, "down")
            else:
                h = routed_mlp(lay.routed, h)
            x = x + branch_output(h, lay.mlp_out_norm, lay.residual_scale)
        x = apply_norm(x, layout.final_norm)
        logits = self.packed_head(x) if packed else F.linear(x, self.head_weight, self.head_bias)
        if layout.logits_divisor is not None:
            logits = logits / layout.logits_divisor
        if layout.final_softcap is not None:
            logits = softcap(logits, layout.final_softcap)
        logits = logits.float()
        return [logits[rows] for rows in bounds]

    def _attention_inputs(self, group: DecodeRows) -> tuple[dict, dict, dict]:
        """A group's rotary tables, masks and first columns, per attention kind."""
        layout, positions, mask, cache = self.layout, group.positions, group.mask, group.cache
        span = cache.state.span
        tables = {kind: table.signed_sin(positions, span - 1) for kind, table in self.rotary.items()}  # [n, 1, D]
        masks = {FULL: mask}
        first = {FULL: 0}  # per attention kind, the first column its layers read
        if layout.windowed:
            # From the host's lengths (positions = lengths): no device read.
            first[SLIDING] = start = max(0, min(cache.state.lengths) - layout.window + 1)
            # Rows of one length see exactly [start, span) in a windowed layer: no mask then.
            masks[SLIDING] = None if mask is None else visible(positions, span, layout.window)[:, None, None, start:]
        return tables, masks, first

    def _attend(self, lay, qkv: torch.Tensor, inputs: tuple[dict, dict, dict], kv) -> torch.Tensor:
        """One group's attention in one layer: its q/k/v rows ``[n, q + 2 kv]`` normed and rotated, K/V appended
        to its cache layer ``kv``, the attention output ``[n, q_size]``."""
        tables, masks, first = inputs
        n = qkv.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        qk_size = q_size + kv_size
        qk = qkv[:, :qk_size]
        if lay.proj_norm is not None:
            qk = proj_norms(qk, lay.proj_norm, q_size)
        qk = qk.reshape(n, heads + kv_heads, head_dim)
        if lay.head_norm is not None:
            qk = head_norm(qk, lay.head_norm)
        qk = rotate_signed(qk, *tables[lay.kind])
        keys, values = kv.update(qk[:, heads:, None], qkv[:, qk_size:].view(n, kv_heads, 1, head_dim))
        # The query heads of one K/V head share its keys and the row's mask: folded into the query axis
        # ([n, kv_heads, group, D] against [n, kv_heads, span, D]), K/V are read once, where enable_gqa
        # repeated them (1.15-1.7x slower attention on the CPU, more the longer the span: bench/NOTES.md).
        q = qk[:, :heads].view(n, kv_heads, heads // kv_heads, head_dim)
        if first[lay.kind]:
            keys, values = keys[:, :, first[lay.kind]:], values[:, :, first[lay.kind]:]
        if lay.softcap is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=masks[lay.kind], scale=lay.scaling)
        else:
            out = softcapped_attention(q, keys, values, masks[lay.kind], lay.scaling, lay.softcap)
        return out.reshape(n, q_size)


def with_terms(out: torch.Tensor, x: torch.Tensor, adapted: list[tuple[slice, list]], layer: int,
                name: str) -> torch.Tensor:
    """``out`` (a fused projection of ``x``) with each adapted group's LoRA term added to that group's rows."""
    for rows, terms in adapted:
        term = terms[layer][name]
        if term is not None:
            out[rows].add_(term(x[rows]))  # in place on the view (``+=`` would also copy it back onto itself)
    return out
