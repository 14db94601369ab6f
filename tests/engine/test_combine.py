"""combine: the proxy-tuning formula over sparse per-model rows."""

from __future__ import annotations

import torch

from proxy_engine.combine import Contribution, combine, proxy_tuned


def test_combine_equals_formula_and_skips_absent_rows():
    torch.manual_seed(0)
    base, e1, a1, e2, a2 = (torch.randn(3, 11) for _ in range(5))
    alphas = [0.7, -1.5]
    parts = [
        Contribution(torch.arange(3), torch.ones(3), base),
        Contribution(torch.arange(3), torch.full((3,), alphas[0]), e1),
        Contribution(torch.arange(3), torch.full((3,), -alphas[0]), a1),
        Contribution(torch.arange(3), torch.full((3,), alphas[1]), e2),
        Contribution(torch.arange(3), torch.full((3,), -alphas[1]), a2),
    ]
    expected = proxy_tuned(base, [e1, e2], [a1, a2], alphas)
    torch.testing.assert_close(combine(3, 11, parts, torch.device("cpu")), expected)
    # Row 1 has alpha 0: the small models never computed it, and the result is the base's row.
    sub = [parts[0], Contribution(torch.tensor([0, 2]), torch.tensor([1.0, 1.0]), e1[[0, 2]]),
           Contribution(torch.tensor([0, 2]), torch.tensor([-1.0, -1.0]), a1[[0, 2]])]
    out = combine(3, 11, sub, torch.device("cpu"))
    torch.testing.assert_close(out[1], base[1])
    torch.testing.assert_close(out[0], base[0] + e1[0] - a1[0])


def test_combine_casts_half_precision_to_float32():
    base = torch.randn(2, 5).to(torch.bfloat16)
    out = combine(2, 5, [Contribution(torch.arange(2), torch.ones(2), base)], torch.device("cpu"))
    assert out.dtype == torch.float32
