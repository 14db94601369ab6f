"""A LoRA expert served unmerged, over the very module its anti-expert loads.

An expert given as a LoRA adapter over its anti-expert's checkpoint (adapter.py) is the anti-expert plus, in each
adapted projection, ``y += scale * B (A x)``. Merged, it costs a second copy of the small model and a second read
of its weights every step. Unmerged, the expert's rows run through the anti-expert's own weights and add their
low-rank terms: one copy in memory, and (fast_decode.py) one read of the weights per step for both models' rows.

``LoraAdapter.load`` reads plain LoRA only (peft's ``LORA`` with none of the options that change its inference
math: DoRA, per-module rank or alpha patterns, biases, modules saved whole, ...), adapting the projections the
fast decode step fuses (q, k, v, o, gate, up, down). ``unmerged_reason`` says why another adapter is merged.
Prefill runs through transformers' forward with forward hooks that add the terms while the adapter is
``applied``; both decode steps add them to their fused projections (``layer_terms``). The static CUDA-graph step
(executor/) runs each model in its own graph, so there the weights are shared in memory but read once per model:
``RuntimeConfig.lora_mode`` ``auto`` merges where that step decodes.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ADAPTER_CONFIG = "adapter_config.json"
# adapter_config.json settings that change LoRA's inference math (or add weights besides A and B).
_MATH_CHANGING = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias", "fan_in_fan_out",
                  "trainable_token_indices", "layer_replication", "alora_invocation_tokens", "use_qalora",
                  "target_parameters", "use_bdlora", "arrow_config", "velora_config", "monteclora_config",
                  "kasa_config", "megatron_config")
_PEFT_PREFIX = "base_model.model."


class UnreadableAdapterError(ValueError):
    """An adapter whose weight files cannot be read (truncated, not the format their name says): merging it into a
    copy instead would fail the same way, so it is refused as it is."""


def _unreadable_weights() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, SafetensorError, pickle.UnpicklingError, EOFError)


def read_weights_error(directory: Path, error: BaseException) -> UnreadableAdapterError | None:
    """``error`` (raised reading the adapter at ``directory``) as an ``UnreadableAdapterError`` when it says the
    files cannot be read, else None (the adapter was read, and does not fit)."""
    if not isinstance(error, _unreadable_weights()):
        return None
    return UnreadableAdapterError(f"the adapter's weights in {directory} cannot be read ({type(error).__name__}: "
                                  f"{str(error)[:300]})")


def _fused_projection(module_name: str) -> bool:
    """Whether a module is a decoder layer's projection the decode steps fuse (``layers.N.self_attn.q_proj``, ...,
    ``layers.N.mlp.down_proj``): not an embedding, the head or a routed expert's projection."""
    parts = module_name.split(".")
    if len(parts) < 4 or parts[-4] != "layers" or not parts[-3].isdigit():
        return False
    return (parts[-2], parts[-1]) in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                                      ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                                      ("mlp", "down_proj"))


@dataclass(frozen=True)
class LoraTerm:
    """One adapted projection: ``y += up(down(x))``, ``down`` = A ``[r, in]``, ``up`` = scale * B ``[out, r]``."""

    down: torch.Tensor
    up: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)


def unmerged_reason(directory: Path) -> str | None:
    """Why the adapter at ``directory`` cannot be served unmerged (then it is merged), or None."""
    try:
        settings = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        return f"its {ADAPTER_CONFIG} cannot be read ({error})"
    kind = str(settings.get("peft_type", "")).upper()
    if kind != "LORA":
        return f"it is {kind or 'not LoRA'}, not plain LoRA"
    changed = [key for key in _MATH_CHANGING if settings.get(key) not in (None, False, {}, [], "none")]
    if settings.get("bias", "none") != "none":
        changed.append("bias")
    if changed:
        return f"it sets {', '.join(changed)}"
    return None


def merge_reason(directory: Path | None, lora_mode: str, static: bool) -> str | None:
    """Why an adapter over another role's checkpoint is merged into a copy instead of served unmerged, or None:
    ``lora_mode`` (RuntimeConfig's), the adapter (``directory``, None when it cannot be found), and whether the
    static CUDA-graph step decodes the model (``auto`` merges there)."""
    if lora_mode == "merged":
        return "lora_mode is merged"
    if directory is None:
        return "the adapter is gone"
    reason = unmerged_reason(directory)
    if reason is None and lora_mode == "auto" and static:
        reason = ("the static CUDA-graph step runs each model in its own graph, so unmerged would save the copy's "
                  "memory but not a read; lora_mode unmerged trades that")
    return reason


class LoraAdapter:
    """An adapter's terms, keyed by the module they adapt; ``applied()`` turns on the forward hooks (prefill
    through transformers), ``fast_decode`` reads ``terms`` directly."""

    def __init__(self, name: str, terms: dict[torch.nn.Module, LoraTerm]) -> None:
        self.name = name
        self.terms = terms
        self.active = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def nbytes(self) -> int:
        return sum(t.down.numel() * t.down.element_size() + t.up.numel() * t.up.element_size()
                   for t in self.terms.values())

    @classmethod
    def load(cls, directory: Path, model: torch.nn.Module, name: str) -> LoraAdapter:
        """The adapter at ``directory`` over ``model`` (the checkpoint's own module tree, as peft names it): each
        ``lora_A`` / ``lora_B`` pair on the module it names, in that module's dtype and device, scaled.
        ``ValueError`` naming what does not fit: a module the model lacks, one fast_decode.py does not fuse, a
        shape that differs, a weight that is neither A nor B."""
        from peft.utils import load_peft_weights

        settings = json.loads((directory / ADAPTER_CONFIG).read_text())
        try:
            weights = load_peft_weights(str(directory), device="cpu")
        except Exception as error:
            unreadable = read_weights_error(directory, error)
            if unreadable is None:
                raise
            raise unreadable from None
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            stem, _, kind = key.removesuffix(".weight").rpartition(".")
            if kind not in ("lora_A", "lora_B"):
                raise ValueError(f"{key} is not a LoRA A or B weight")
            pairs.setdefault(stem.removeprefix(_PEFT_PREFIX), {})[kind] = tensor
        alpha = float(settings.get("lora_alpha", 8))
        terms: dict[torch.nn.Module, LoraTerm] = {}
        for module_name, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(f"{module_name} has {', '.join(sorted(pair))} only")
            if not _fused_projection(module_name):
                raise ValueError(f"it adapts {module_name}, which the fast decode step does not fuse")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise ValueError(f"the model has no module {module_name}") from None
            a, b = pair["lora_A"], pair["lora_B"]
            weight = module.weight
            if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0] or a.shape[0] != b.shape[1]:
                raise ValueError(f"{module_name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit its weight "
                                 f"{tuple(weight.shape)}")
            rank = a.shape[0]
            scale = alpha / (rank**0.5 if settings.get("use_rslora") else rank)
            # The scale folded into B in float32, then both in the module's dtype: one op less per term.
            up = (b.float() * scale).to(weight.dtype)
            terms[module] = LoraTerm(a.to(weight.dtype).to(weight.device).contiguous(), up.to(weight.device))
        if not terms:
            raise ValueError("it holds no LoRA weights")
        return cls(name, terms)

    def install(self) -> None:
        """Forward hooks on the adapted modules: while ``applied``, each adds its term to the module's output.
        Installed once, by the runner that applies it (on the thread that runs the model: a hook registered while
        another thread runs the module could change the hooks under its forward)."""
        if self._hooks:
            return
        for module, term in self.terms.items():
            self._hooks.append(module.register_forward_hook(self._hook(term)))

    def release(self) -> None:
        """Remove the hooks and drop the terms (the adapter was unloaded: nothing adds them any more)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.terms = {}

    def _hook(self, term: LoraTerm):
        def add_term(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return output + term(args[0]) if self.active else None

        return add_term

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False


def layer_terms(adapter: LoraAdapter, layers: list[torch.nn.Module]) -> list[dict[str, LoraTerm | None]]:
    """``adapter``'s terms per decoder layer, on the fused projections both decode steps run: ``qkv``, ``o``, and
    for a dense MLP ``gate_up`` and ``down`` (None where the adapter leaves one alone)."""
    terms = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj]}
        if hasattr(mlp, "gate_proj"):  # a routed block has none (its experts are not adapted: load refuses them)
            groups.update(gate_up=[mlp.gate_proj, mlp.up_proj], down=[mlp.down_proj])
        terms.append({name: fused_term(adapter.terms, modules) for name, modules in groups.items()})
    return terms


def fused_term(terms: dict[torch.nn.Module, LoraTerm], modules: list[torch.nn.Module]) -> LoraTerm | None:
    """The terms of ``modules`` (q, k, v, say) as one term of their fused projection: A stacked ``[sum r, in]``,
    B block-diagonal ``[sum out, sum r]`` (a module without a term adds zero rows); None when none has one."""
    present = [terms.get(module) for module in modules]
    if all(term is None for term in present):
        return None
    downs = [term.down for term in present if term is not None]
    down = torch.cat(downs) if len(downs) > 1 else downs[0]
    up = down.new_zeros(sum(m.weight.shape[0] for m in modules), down.shape[0])
    row = column = 0
    for module, term in zip(modules, present):
        if term is not None:
            rank = term.down.shape[0]
            up[row : row + module.weight.shape[0], column : column + rank] = term.up
            column += rank
        row += module.weight.shape[0]
    return LoraTerm(down, up)
