"""The proxy-tuning arithmetic, as pure functions over logits.

    s = s_base + sum_i alpha_i * (s_expert_i - s_anti_i)

Every model contributes ``weight * logits`` to the rows it computed: the base with weight 1, expert i with
``+alpha_i`` and anti-expert i with ``-alpha_i``. A model absent from a row (alpha 0, or the base for the
"expert alone" target) contributes nothing and was never run for it. Everything is summed in float32 on the
base's device, whatever dtype and device each model ran in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Contribution:
    """One model's logits for some rows of the batch."""

    rows: torch.Tensor  # [b] long: which batch rows these logits belong to
    weights: torch.Tensor  # [b] float32: that model's weight in each of those rows
    logits: torch.Tensor  # [b, V]

    @classmethod
    def of(cls, logits: torch.Tensor, rows: list[int], weights: list[float]) -> Contribution:
        """``logits`` (one row per entry of ``rows``) placed at those batch rows with those weights."""
        return cls(torch.tensor(rows, dtype=torch.long), torch.tensor(weights, dtype=torch.float32), logits)


def moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` as float32 on ``device``. A copy to an accelerator is asynchronous (its stream orders the use
    after the copy); a copy to the host is synchronous, since the CPU would read the tensor at once, possibly
    before a non-blocking device-to-host copy had landed (base on the CPU, expert on a GPU)."""
    return tensor.to(device=device, dtype=torch.float32, non_blocking=non_blocking_to(device))


def non_blocking_to(device: torch.device | str) -> bool:
    """Whether a copy *to* ``device`` may be asynchronous: only when the host does not read the result."""
    return torch.device(device).type != "cpu"


def combine(batch_size: int, vocab_size: int, parts: list[Contribution], device: torch.device) -> torch.Tensor:
    """``[batch_size, V]`` float32: the weighted sum of every contribution, row by row.

    A model appears at most once per row, so each part's rows are unique and a gather-add-scatter is exact
    (and, on the CPU, far faster than ``index_add_``).
    """
    out = torch.zeros((batch_size, vocab_size), dtype=torch.float32, device=device)
    for part in parts:
        count = part.rows.numel()
        if count == 0:
            continue
        logits = moved(part.logits, device)
        weights = moved(part.weights, device)
        weighted = logits * weights[:, None]
        if count == batch_size and bool((part.rows == torch.arange(count)).all()):
            out += weighted  # the common case: the model computed every row, in order
        else:
            rows = part.rows.to(device)
            out[rows] += weighted
    return out


def proxy_tuned(
    base: torch.Tensor, experts: list[torch.Tensor], antis: list[torch.Tensor], alphas: list[float]
) -> torch.Tensor:
    """The formula as written, for one batch where every model computed every row (reference and tests)."""
    out = base.float().clone()
    for expert, anti, alpha in zip(experts, antis, alphas):
        out += alpha * (expert.float() - anti.float())
    return out
