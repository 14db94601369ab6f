"""A sampling batch: what one step's rows need to turn combined logits into tokens, built once from them.

    batch = SamplingBatch.build(sequences, device)
    tokens = batch.sample(batch.process(combined))
    logprobs = batch.logprobs(combined, tokens)   # of the combined distribution, before any processor

``process`` runs the logit processors in ``PROCESSORS`` order; each is built from the sequences by a factory
that returns ``None`` when no row needs it (then it costs nothing). A new per-row processor (a
structured-output grammar's token mask, say) is one more factory in that tuple. The math is ``sampler.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from proxy_engine import sampler
from proxy_engine.bad_words import banned_next
from proxy_engine.grammar import apply_grammar_masks
from proxy_engine.request import NoTokenAllowedError
from proxy_engine.sequence import Sequence

# ``[B, V] -> [B, V]`` for the batch's rows; it may change its argument in place (``process`` hands it a copy).
LogitsProcessor = Callable[[torch.Tensor], torch.Tensor]
# Builds a batch's processor from its sequences (row i is sequences[i]), or None when no row needs it.
ProcessorFactory = Callable[[list[Sequence], torch.device], LogitsProcessor | None]


def _float_column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def grammar_mask(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    """Structured outputs: each constrained row keeps only what its grammar allows next (its stop ids only where
    the grammar may end); free rows in the same batch are untouched."""
    matchers = [s.grammar for s in sequences]
    constrained = [m for m in matchers if m is not None]
    if not constrained:
        return None
    stop_ids = [sorted(s.stop_ids()) if s.grammar is not None else [] for s in sequences]
    words = constrained[0].words
    return lambda logits: apply_grammar_masks(logits, matchers, stop_ids, words)


def logit_bias(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    biases = [s.params.logit_bias for s in sequences]
    if not any(biases):
        return None
    rows = [{int(k): float(v) for k, v in (bias or {}).items()} for bias in biases]
    return lambda logits: sampler.apply_logit_bias(logits, rows)


def allowed_tokens(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    """vLLM's ``allowed_token_ids``: a row that lists them may generate nothing else."""
    allowed = [s.params.allowed_token_ids for s in sequences]
    if not any(allowed):
        return None
    return lambda logits: sampler.keep_only(logits, allowed)


def bad_words_ban(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    """vLLM's ``bad_words``: the token that would complete a bad word gets ``-inf``."""
    banned = [banned_next(s.bad_word_ids, s.output_ids) if s.bad_word_ids else [] for s in sequences]
    if not any(banned):
        return None
    return lambda logits: sampler.ban_tokens(logits, banned)


def min_tokens_ban(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    """EOS and stop ids may not end a sequence before its ``min_tokens``."""
    banned = [s.banned_ids() for s in sequences]
    if not any(banned):
        return None
    return lambda logits: sampler.ban_tokens(logits, banned)


def penalties(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    params = [s.params for s in sequences]
    if not any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
        return None
    presence = _float_column([p.presence_penalty for p in params], device)
    frequency = _float_column([p.frequency_penalty for p in params], device)
    repetition = _float_column([p.repetition_penalty for p in params], device)

    def penalise(logits: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(logits)
        prompt_mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        for row, sequence in enumerate(sequences):
            if sequence.output_ids:
                ids = torch.tensor(sequence.output_ids, dtype=torch.long, device=logits.device)
                counts[row].index_add_(0, ids, torch.ones(len(ids), device=logits.device))
            if sequence.params.repetition_penalty != 1.0:
                prompt_mask[row, sequence.prompts[sequence.runners[0]]] = True
        return sampler.apply_penalties(logits, counts, prompt_mask, presence, frequency, repetition)

    return penalise


def temperature_scaling(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    """``logits / T`` for sampled rows, before any filter: top-p then measures the nucleus that is sampled."""
    values = [s.params.temperature for s in sequences]
    if all(t in (0.0, 1.0) for t in values):
        return None
    column = _float_column(values, device)
    return lambda logits: sampler.apply_temperature(logits, column.to(logits.device))


def top_k_top_p_min_p(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    params = [s.params for s in sequences]
    if not any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params if not p.greedy):
        return None
    top_k = torch.tensor([p.top_k if p.top_k > 0 else 0 for p in params], dtype=torch.long, device=device)
    top_p = _float_column([p.top_p for p in params], device)
    min_p = _float_column([p.min_p for p in params], device)
    return lambda logits: sampler.filter_top_k_top_p_min_p(logits, top_k, top_p, min_p)


def typical(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    """TGI's ``typical_p`` (locally typical sampling), for sampled rows that set it."""
    params = [s.params for s in sequences]
    if not any(p.typical_p < 1.0 for p in params if not p.greedy):
        return None
    mass = _float_column([p.typical_p for p in params], device)
    return lambda logits: sampler.filter_typical(logits, mass.to(logits.device))


def forced_tokens(sequences: list[Sequence], device: torch.device) -> LogitsProcessor | None:
    """A row past its thinking budget writes its closing tag, token by token, and a replayed one its replay
    (Sequence.forced_token): the one token it may write. Last, so that nothing after it moves the choice (a bias or
    a ban on the tag cannot keep the block open)."""
    forced = [s.forced_token() for s in sequences]
    if all(token is None for token in forced):
        return None
    return lambda logits: sampler.force_tokens(logits, forced)


# The one place that orders the processors (docs/sampling.md): the grammar mask first (as vLLM applies its
# bitmask: what the grammar forbids is out before the others), bias, the allowed set and bans, penalties, then
# transformers' warpers in their order: temperature, top-k, top-p over what top-k kept, min-p, typical; then a
# thinking budget's or a replay's forced token, which overrides them all.
PROCESSORS: tuple[ProcessorFactory, ...] = (
    grammar_mask, logit_bias, allowed_tokens, bad_words_ban, min_tokens_ban, penalties, temperature_scaling,
    top_k_top_p_min_p, typical, forced_tokens,
)


@dataclass(kw_only=True)
class SamplingBatch:
    """One step's rows: their processors (in order), temperatures, generators and logprob requests."""

    processors: list[LogitsProcessor]
    temperature: torch.Tensor  # [B] float32; 0: greedy
    generators: list[torch.Generator | None]
    logprobs: list[int | None]  # per row: None, or the chosen token's logprob plus the top k

    @classmethod
    def build(
        cls, sequences: list[Sequence], device: torch.device, factories: tuple[ProcessorFactory, ...] = PROCESSORS
    ) -> SamplingBatch:
        built = (factory(sequences, device) for factory in factories)
        return cls(
            processors=[p for p in built if p is not None],
            temperature=_float_column([s.params.temperature for s in sequences], device),
            generators=[s.generator for s in sequences],
            logprobs=[s.params.logprobs for s in sequences],
        )

    def process(self, combined: torch.Tensor) -> torch.Tensor:
        """The logits to sample from; ``combined`` itself stays untouched (logprobs are read from it)."""
        if not self.processors:
            return combined
        logits = combined.clone()
        for processor in self.processors:
            logits = processor(logits)
        return logits

    def sample(self, logits: torch.Tensor) -> list[int]:
        """Draw from the processed logits (temperature already applied); greedy rows take the argmax.

        ``NoTokenAllowedError`` when a row's processors left every logit ``-inf``: its argmax would be token 0, and
        its draw a NaN distribution. Only processed logits can be so (raw ones are finite)."""
        if self.processors and bool((logits.amax(dim=-1) == float("-inf")).any()):
            raise NoTokenAllowedError()
        return sampler.draw(logits, self.temperature.to(logits.device) == 0, self.generators).tolist()

    def top_logprobs(
        self, combined: torch.Tensor, tokens: list[int]
    ) -> list[tuple[float, list[int], list[float]] | None]:
        """Per row that asked: (the chosen token's logprob, the top-k ids, their logprobs); None elsewhere."""
        want = [k for k in self.logprobs if k is not None]
        if not want:
            return [None] * len(tokens)
        chosen, values, ids = sampler.top_logprobs(combined, torch.tensor(tokens, device=combined.device), max(want))
        chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
        return [
            None if k is None else (chosen[row], ids[row][:k], values[row][:k]) for row, k in enumerate(self.logprobs)
        ]
