"""Per-model logprobs of generated tokens (``SamplingParams.model_logprobs``): what each model of the
combination thought of the token the proxy chose, as the research code's analysis mode keeps, but per request.

    rows = model_logprobs(parts, combined, tokens, wanted, roles)   # after sampling, from the step's logits

For each row that asked (``wanted[row]`` is its k), one ``(role, chosen logprob, top ids, top logprobs)`` per
role of each model that computed the row (each model's own ``log_softmax``, not weighted; a model playing two
roles, an anti-expert two pairs share, is one distribution named by both), then the combined distribution's
as ``proxy``. Pure tensor work on the logits the step already holds: nothing runs again, and a step where no
row asked never calls it.
"""

from __future__ import annotations

import torch

from proxy_engine.combine import Contribution
from proxy_engine.sampler import top_logprobs

PROXY_ROLE = "proxy"

# One distribution at one position: (role, the chosen token's logprob, top-k ids, their logprobs).
Distribution = tuple[str, float, list[int], list[float]]


def model_logprobs(
    parts: dict[int, Contribution],
    combined: torch.Tensor,
    tokens: list[int],
    wanted: list[int | None],
    roles: list[tuple[str, ...]],
) -> list[list[Distribution] | None]:
    """Per batch row: its distributions (models in runner order, then the proxy), or None where not asked.

    ``parts`` holds each runner's logits for the rows it computed (``Contribution.rows`` are batch rows);
    ``combined [B, V]`` the weighted sum the tokens were drawn from.
    """
    asked = [row for row, k in enumerate(wanted) if k is not None]
    out: list[list[Distribution] | None] = [None] * len(tokens)
    if not asked:
        return out
    k = max(wanted[row] or 0 for row in asked)
    for row in asked:
        out[row] = []
    for index in sorted(parts):
        part = parts[index]
        batch_rows = part.rows.tolist()
        local = [(i, row) for i, row in enumerate(batch_rows) if wanted[row] is not None]
        if local:
            picked = torch.tensor([i for i, _ in local], dtype=torch.long, device=part.logits.device)
            _append(out, roles[index], part.logits[picked].float(), [row for _, row in local], tokens, wanted, k)
    _append(out, (PROXY_ROLE,), combined[asked].float(), asked, tokens, wanted, k)
    return out


def _append(
    out: list[list[Distribution] | None],
    names: tuple[str, ...],
    logits: torch.Tensor,
    rows: list[int],
    tokens: list[int],
    wanted: list[int | None],
    k: int,
) -> None:
    chosen = torch.tensor([tokens[row] for row in rows], dtype=torch.long, device=logits.device)
    chosen_lp, top_values, top_ids = (t.tolist() for t in top_logprobs(logits, chosen, k))
    for i, row in enumerate(rows):
        mine = wanted[row] or 0
        entries = out[row]
        assert entries is not None
        entries.extend((role, chosen_lp[i], top_ids[i][:mine], top_values[i][:mine]) for role in names)
