"""From combined logits to tokens: logit processors, then greedy or seeded sampling. Pure functions.

Order (transformers' warpers; docs/sampling.md): logit_bias -> min_tokens ban -> repetition / frequency /
presence penalties -> temperature -> top-k -> top-p over what top-k kept (renormalised) -> min-p -> sample.
Temperature comes before every filter, so top-p measures the nucleus of the distribution that is sampled.
Every row has its own ``torch.Generator`` so a seeded request draws the same numbers whatever else is in the
batch; a generator is used on its own device (the logits' device, where the engine creates it).
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
    """Set ``-inf`` on each row's banned ids (end ids before ``min_tokens``, the ends of bad words)."""
    for row, ids in enumerate(banned):
        if ids:
            logits[row, list(ids)] = float("-inf")
    return logits


def keep_only(logits: torch.Tensor, allowed: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """Set ``-inf`` on every id but each row's ``allowed`` ones (rows with None keep everything)."""
    for row, ids in enumerate(allowed):
        if ids:
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            keep[list(ids)] = True
            logits[row].masked_fill_(~keep, float("-inf"))
    return logits


def force_tokens(logits: torch.Tensor, forced: Sequence[int | None]) -> torch.Tensor:
    """Each row with a forced id can draw only that id (its logit 0, every other ``-inf``); None rows are untouched."""
    for row, token in enumerate(forced):
        if token is not None:
            logits[row].fill_(float("-inf"))
            logits[row, token] = 0.0
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


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits / T`` row by row; rows with ``T == 0`` (greedy) are left as they are (argmax is unchanged)."""
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(logits.dtype)
    return logits / scale[:, None]


def filter_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (``-inf``) tokens outside each row's top-k, then its top-p nucleus, then its min-p set.

    Applied to temperature-scaled logits. ``top_k [B]`` (0 = off), ``top_p [B]`` (1 = off), ``min_p [B]``
    (0 = off). Top-p is measured on the distribution renormalised over what top-k kept, and min-p on the one
    renormalised over what top-p kept (as transformers' warpers chain); the most likely token always stays.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    remove = ranks >= k[:, None]
    remove[:, 0] = False
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # Drop a token once the mass before it already reaches top_p (the smallest set holding top_p).
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p[:, None]
    remove[:, 0] = False
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    remove |= probs < (min_p[:, None] * probs[:, :1])
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def filter_typical(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022; transformers' ``TypicalLogitsWarper``, TGI's
    ``typical_p``): keep each row's tokens whose surprisal is closest to the distribution's entropy, in that
    order, until they hold ``typical_p [B]`` of the mass (1 = off). The most typical token always stays.

    Applied after the other filters, to their output (masked tokens have no mass and are never kept).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nan_to_num().sum(dim=-1, keepdim=True)  # 0 * -inf is 0, not nan
    distance, order = torch.sort((-log_probs - entropy).abs(), dim=-1)  # most typical first; masked last (inf)
    mass = probs.gather(-1, order).cumsum(dim=-1)
    # The last kept rank: the first whose running mass reaches typical_p (as transformers: ties by distance kept).
    last = (mass < typical_p[:, None]).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    remove_sorted = distance > distance.gather(-1, last)
    remove_sorted[:, 0] = False
    remove = torch.empty_like(remove_sorted).scatter_(-1, order, remove_sorted)
    off = typical_p >= 1.0
    if bool(off.any()):
        remove[off] = False
    return logits.masked_fill(remove, float("-inf"))


def draw(logits: torch.Tensor, greedy: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """``[B]`` token ids: argmax for greedy rows, else a draw from ``softmax(logits)`` (already scaled and
    filtered) with the row's own generator, on the generator's device."""
    tokens = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return tokens
    probs = torch.softmax(logits, dim=-1)
    for row in torch.nonzero(~greedy).flatten().tolist():
        generator = generators[row]
        row_probs = probs[row]
        if generator is not None and generator.device != row_probs.device:
            row_probs = row_probs.to(generator.device)  # never reached when the engine places generators
        tokens[row] = torch.multinomial(row_probs, 1, generator=generator).squeeze().to(tokens.device)
    return tokens


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the combined distribution: ``(chosen [B], top values [B, k], top ids [B, k])``."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
    values, ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, values, ids
