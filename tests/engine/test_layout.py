"""One model for the roles that name it (proxy_engine/layout.py): two expert pairs with one anti-expert load it
once, run it once per step with the sum of its roles' weights, and answer as two copies of it would."""

from __future__ import annotations

import torch

from proxy_engine.config import EngineConfig, ExpertPairConfig, ModelConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.layout import ModelLayout
from proxy_engine.loader import load_models
from proxy_engine.placement import plan_placement
from tests.engine.conftest import run_to_end, submit


def _config(family, *, shared: bool) -> EngineConfig:
    """Two pairs over the tiny family: the expert, and the same expert loaded as another model (an explicit
    dtype makes its config distinct, its weights equal); both with the anti-expert, or the second pair with a
    distinct copy of it."""
    anti = ModelConfig(path=str(family.anti_expert))
    return EngineConfig(
        base=ModelConfig(path=str(family.base)),
        experts=[
            ExpertPairConfig(expert=ModelConfig(path=str(family.expert)), anti_expert=anti),
            ExpertPairConfig(expert=ModelConfig(path=str(family.expert), dtype="float32"),
                             anti_expert=anti if shared else ModelConfig(path=str(family.anti_expert),
                                                                         dtype="float32")),
        ],
    )


def test_layout_gathers_the_roles_of_one_model(tiny_family):
    layout = ModelLayout.of(_config(tiny_family, shared=True))
    assert [slot.roles for slot in layout.slots] == [("base",), ("expert",), ("anti_expert", "anti_expert_1"),
                                                     ("expert_1",)]
    assert layout.pairs == ((1, 2), (3, 2))
    assert layout.proxy_weights([1.0, 0.5]) == [1.0, 1.0, -1.5, 0.5]
    assert layout.proxy_weights([0.0, 0.0]) == [1.0, 0.0, 0.0, 0.0]  # alpha 0: the small models do not run
    assert layout.base_weights() == [1.0, 0.0, 0.0, 0.0] and layout.expert_weights() == [0.0, 1.0, 0.0, 0.0]
    assert [s.name for s in layout.shared] == ["anti_expert"]
    distinct = ModelLayout.of(_config(tiny_family, shared=False))
    assert len(distinct.slots) == 5 and distinct.pairs == ((1, 2), (3, 4)) and not distinct.shared


def _run(config: EngineConfig, alpha: list[float]) -> tuple[ProxyEngine, dict, list[torch.Tensor]]:
    engine = ProxyEngine(load_models(config), config)
    seen: list[torch.Tensor] = []
    engine.logits_hook = lambda sequences, logits: seen.append(logits.clone())
    submit(engine, "greedy", "The quick brown fox", temperature=0, max_tokens=8, ignore_eos=True, alpha=alpha)
    submit(engine, "sampled", "Hello there", temperature=1.0, seed=7, max_tokens=8, ignore_eos=True, alpha=alpha)
    return engine, run_to_end(engine), seen


def test_a_shared_anti_expert_answers_as_two_copies_of_it(tiny_family):
    alpha = [1.0, 0.5]
    shared, shared_out, shared_logits = _run(_config(tiny_family, shared=True), alpha)
    copies, copies_out, copies_logits = _run(_config(tiny_family, shared=False), alpha)
    assert len(shared.runners) == 4 and len(copies.runners) == 5
    for key in (("greedy", 0), ("sampled", 0)):
        assert shared_out[key]["tokens"] == copies_out[key]["tokens"]
        assert shared_out[key]["text"] == copies_out[key]["text"]
    assert len(shared_logits) == len(copies_logits)
    for ours, theirs in zip(shared_logits, copies_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def test_one_pair_at_alpha_0_still_runs_the_shared_model_for_the_other(tiny_family):
    """The shared anti-expert's weight is -alpha_2 alone when pair 1 is off; it runs for the row."""
    shared, shared_out, _ = _run(_config(tiny_family, shared=True), [0.0, 0.7])
    _, copies_out, _ = _run(_config(tiny_family, shared=False), [0.0, 0.7])
    assert shared_out[("greedy", 0)]["tokens"] == copies_out[("greedy", 0)]["tokens"]


def test_the_plan_counts_a_shared_model_once(tiny_family):
    shared = plan_placement(_config(tiny_family, shared=True))
    copies = plan_placement(_config(tiny_family, shared=False))
    assert [m.name for m in shared.models] == ["base", "expert_0", "anti_expert_0", "expert_1"]
    assert shared.models[2].also == ["anti_expert_1"]
    anti = shared.models[2].memory.weight_bytes
    assert shared.device_weight_bytes["cpu"] == copies.device_weight_bytes["cpu"] - anti
