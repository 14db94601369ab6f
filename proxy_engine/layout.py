"""Which loaded model plays each role of the combination, and each model's weight in a row.

A deployment names one model per role: the base, then an expert and an anti-expert per pair. Roles that name
the same model (equal ``ModelConfig``: path, adapter, dtype, device, prompt format, ...) share one loaded
model, which runs once per step. Two experts tuned from one small model (the paper's chat and code experts
over Llama-2, two LoRA adapters of one model) share their anti-expert: it is loaded once, holds one KV cache,
and its weight in a row is the sum of its roles' (``-alpha_1 - alpha_2``), which is the formula

    s = s_base + sum_i alpha_i * (s_expert_i - s_anti_i)

with the shared term gathered. A role's model is a slot index: 0 is the base's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy_engine.config import EngineConfig, ModelConfig

# ModelConfig fields that do not change a model's weights (how it is prompted, which tokenizer, its adapter).
_NOT_WEIGHTS = {"adapter", "tokenizer", "prompt_format", "chat_template", "tools_preamble"}


def same_weights(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether ``a`` and ``b`` load the same weights, adapters aside (same checkpoint, dtype, placement, ...)."""
    return a.model_dump(exclude=_NOT_WEIGHTS) == b.model_dump(exclude=_NOT_WEIGHTS)


@dataclass(frozen=True)
class Slot:
    """One loaded model and the roles it plays (``base``, ``expert``, ``anti_expert``, ``expert_1``, ...)."""

    roles: tuple[str, ...]
    config: ModelConfig

    @property
    def name(self) -> str:
        """Its first role: how logs, metrics and errors name it."""
        return self.roles[0]


def role_names(index: int) -> tuple[str, str]:
    """Pair ``index``'s expert and anti-expert role names: ``expert`` / ``anti_expert``, then ``expert_1``, ..."""
    suffix = "" if index == 0 else f"_{index}"
    return f"expert{suffix}", f"anti_expert{suffix}"


@dataclass(frozen=True)
class ModelLayout:
    """The slots and pairs of one deployment, and what a row of the default combination weighs: read as one
    snapshot, since a running engine may add and remove pairs (engine.py) while requests are rendered."""

    slots: tuple[Slot, ...]  # distinct models in role order: the base's first
    pairs: tuple[tuple[int, int], ...]  # per expert pair: (its expert's slot, its anti-expert's slot)
    alphas: tuple[float, ...] = ()  # per pair: its configured alpha
    members: tuple[int, ...] = ()  # the pairs of the default combination (in_default), by index
    retired: frozenset[int] = frozenset()  # pairs removed from a running engine: they serve nothing

    @classmethod
    def of(cls, config: EngineConfig, retired: frozenset[int] = frozenset(),
           unshared: Mapping[int, int] | None = None) -> ModelLayout:
        """``retired``: the pairs a running engine removed (they keep their index and slots, so that every later
        index stays put); ``unshared``: slot -> the first pair index that may not share it (the slots a running
        engine's removals left to no live pair, and the pair count then). Worked out again at any time, every pair
        lands on the slots it was given when it was added."""
        unshared = unshared or {}
        slots: list[Slot] = []

        def place(role: str, model: ModelConfig, pair: int) -> int:
            for index, slot in enumerate(slots):
                if slot.config == model and pair < unshared.get(index, pair + 1):
                    slots[index] = Slot((*slot.roles, role), model)
                    return index
            slots.append(Slot((role,), model))
            return len(slots) - 1

        place("base", config.base, -1)
        pairs = []
        for index, pair in enumerate(config.experts):
            expert, anti = role_names(index)
            pairs.append((place(expert, pair.expert, index), place(anti, pair.anti_expert, index)))
        return cls(tuple(slots), tuple(pairs), tuple(config.default_alphas), tuple(config.default_pairs),
                   frozenset(retired))

    def live_slots(self) -> set[int]:
        """The slots some live pair (or the base) uses."""
        return {0} | {slot for index, pair in enumerate(self.pairs) if index not in self.retired for slot in pair}

    def slots_of(self, pairs: list[int] | tuple[int, ...]) -> set[int]:
        """The base's slot and those of ``pairs``: the models a row over those pairs runs."""
        return {0} | {slot for index in pairs for slot in self.pairs[index]}

    def adapter_host(self, index: int) -> int | None:
        """The slot whose model slot ``index`` is but for its adapter (an expert's LoRA over its anti-expert's
        checkpoint: lora.py can serve it over that slot's weights), or None."""
        config = self.slots[index].config
        if config.adapter is None:
            return None
        for other, slot in enumerate(self.slots):
            if other != index and slot.config.adapter is None and same_weights(slot.config, config):
                return other
        return None

    def budget_host(self, index: int) -> int | None:
        """The slot whose prefix-cache budget slot ``index`` draws on: its adapter's host when it serves no pair of
        the default combination (an adapter served by name, as vLLM's LoRA adapters share one pool, so loading
        many holds one budget), else None (a model of the default combination keeps the budget it was sized for)."""
        if index in self.slots_of(self.members):
            return None
        return self.adapter_host(index)

    @property
    def shared(self) -> list[Slot]:
        """The models that play several roles."""
        return [slot for slot in self.slots if len(slot.roles) > 1]

    def proxy_weights(self, alphas: list[float]) -> list[float]:
        """Each model's weight in a proxy-tuned row: the base 1, expert i +alpha_i, anti-expert i -alpha_i,
        summed over the roles a model plays (0: the model does not run for the row)."""
        weights = [0.0] * len(self.slots)
        weights[0] += 1.0
        for (expert, anti), alpha in zip(self.pairs, alphas, strict=True):
            weights[expert] += alpha
            weights[anti] -= alpha
        return weights

    def base_weights(self) -> list[float]:
        weights = [0.0] * len(self.slots)
        weights[0] = 1.0
        return weights

    def expert_weights(self, pair: int = 0) -> list[float]:
        """One pair's expert alone (the first pair's by default)."""
        weights = [0.0] * len(self.slots)
        weights[self.expert_slot(pair)] = 1.0
        return weights

    def expert_slot(self, pair: int = 0) -> int:
        return self.pairs[pair][0]
