"""The fusion ablation of the static step (bench/fusions.py): each variant computes the served step's logits, so
the GPU bench times the same math; the timings, the profile and the report on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from bench import fusions
from proxy_engine.executor.static_cache import SlotPlan, StaticSlotKVCache
from tests.engine.test_kv_cache import _random_model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])  # rope scaling, grouped heads; q/k/v biases; q/k norms
@torch.inference_mode()
def test_every_variant_gives_the_served_steps_logits(kind):
    model = _random_model(kind)
    variants = fusions.decoders(model, 80, 32)
    served = variants[fusions.SERVED]
    assert set(variants) == set(fusions.VARIANTS) and not variants["separate q/k/v, gate/up"].fused and served.fused
    cache = StaticSlotKVCache(len(served.layers), SlotPlan(3, 32, 0), served.kv_heads, served.head_dim,
                              served.dtype, torch.device("cpu"))
    slots = torch.arange(3)
    generator = torch.Generator().manual_seed(0)
    for position in range(7):  # a history of seven tokens per row, through the served step
        ids = torch.randint(3, 80, (3,), generator=generator)
        served.step(ids, torch.full((3,), position), slots, 16, cache)
    ids, positions = torch.tensor([5, 17, 42]), torch.tensor([7, 7, 7])
    expected = served.step(ids, positions, slots, 16, copy.deepcopy(cache))
    for name, decoder in variants.items():
        got = decoder.step(ids, positions, slots, 16, copy.deepcopy(cache))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
    # and the variants really differ in their ops: the unfused forms are the subclasses' own
    nothing = variants["nothing fused"]
    assert nothing.rms_norm is not served.rms_norm and nothing.rotate is not served.rotate
    assert nothing.linear_add is not served.linear_add


def test_timings_profile_and_report_on_the_cpu():
    model = _random_model("llama")
    timings = fusions.time_variants(model, 80, [1, 3], span=32, steps=2)
    assert set(timings) == {"1", "3"}
    for table in timings.values():
        assert set(table) == set(fusions.VARIANTS)
        for row in table.values():
            assert row["eager_ms"] > 0 and row["graph_ms"] is None and row["graph vs served"] is None
        assert table[fusions.SERVED]["eager vs served"] == 1.0
    profile = fusions.profile_step(model, 80, rows=3, span=32, top=5)
    assert profile["clock"] == "host" and len(profile["top"]) == 5 and profile["kernel_ms_per_step"] > 0
    names = [kernel["name"] for kernel in profile["top"]]
    assert all(name.startswith("aten::") for name in names)
    assert sum(kernel["share"] for kernel in profile["top"]) <= 1.0 + 1e-6
    lines = fusions.markdown({"timings": {"tiny": timings}, "profiles": {"tiny": profile}})
    text = "\n".join(lines)
    assert "| nothing fused | 3 | - | - |" in text and "profile, tiny, one eager step of 3 rows" in text
