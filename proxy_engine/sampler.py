"""From combined logits to tokens: logit processors, then greedy or seeded sampling. Pure functions.

Order (as vLLM and transformers do it): logit_bias -> min_tokens ban -> repetition / frequency / presence
penalties -> temperature -> top-k -> top-p -> min-p -> sample. Every row has its own ``torch.Generator`` so a
seeded request draws the same numbers whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float] | None]) -> torch.Tensor:
    """Add each row's ``{token_id: bias}`` in place."""
    for row, bias in enumerate(biases):
        if bias:
            ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=logits.device)
            values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
            logits[row].index_add_(0, ids, values)
    return logits


def ban_tokens(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """Set ``-inf`` on each row's banned ids (EOS and stop ids before ``min_tokens``)."""
    for row, ids in enumerate(banned):
        if ids:
            logits[row, list(ids)] = float("-inf")
    return logits


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; the CTRL repetition penalty on prompt + output.

    ``output_counts [B, V]`` counts each row's generated tokens, ``prompt_mask [B, V]`` marks its prompt tokens;
    ``presence``, ``frequency``, ``repetition`` are ``[B]``.
    """
    seen = (output_counts > 0) | prompt_mask
    rep = repetition[:, None].expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency[:, None] * output_counts
    logits = logits - presence[:, None] * (output_counts > 0).to(logits.dtype)
    return logits


def filter_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (``-inf``) tokens outside each row's top-k, nucleus top-p and min-p sets.

    ``top_k [B]`` (0 = off), ``top_p [B]`` (1 = off), ``min_p [B]`` (0 = off). The most likely token always stays.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    remove = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the mass before it already reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p[:, None]
    remove |= probs < (min_p[:, None] * probs[:, :1])
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """``[B]`` token ids: argmax where temperature is 0, else a draw from ``softmax(logits / T)``.

    Each sampled row draws from its own generator (batch-invariant seeds).
    """
    greedy = temperature == 0
    tokens = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return tokens
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    for row in torch.nonzero(~greedy).flatten().tolist():
        tokens[row] = torch.multinomial(probs[row], 1, generator=generators[row]).squeeze()
    return tokens


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the combined distribution: ``(chosen [B], top values [B, k], top ids [B, k])``."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
    values, ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, values, ids
