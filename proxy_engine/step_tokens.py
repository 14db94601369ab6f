"""Tokens per engine step, as a histogram the engine keeps and the server exports (vLLM's
``iteration_tokens_total``: how full each step is, and by its count that the engine is stepping at all).

A step's tokens are vLLM's: the prompt tokens of the prefills it completed plus the tokens it generated. The
engine stays free of Prometheus: it counts into fixed buckets, and the server turns a ``StepTokenCounts`` into
a metric family when scraped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# vLLM's buckets for the series, so that dashboards comparing the two read the same bands.
STEP_TOKEN_BUCKETS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class StepTokenCounts:
    """A reading of the histogram: ``counts[i]`` steps with at most ``STEP_TOKEN_BUCKETS[i]`` tokens (and more
    than the bucket before), the last one every step above the top bucket; ``total`` the tokens of them all."""

    counts: tuple[int, ...] = (0,) * (len(STEP_TOKEN_BUCKETS) + 1)
    total: int = 0

    @property
    def steps(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (upper bound, steps at or under it), ending with ``+Inf``."""
        bounds = [*(str(float(b)) for b in STEP_TOKEN_BUCKETS), "+Inf"]
        running, out = 0, []
        for bound, count in zip(bounds, self.counts):
            running += count
            out.append((bound, running))
        return out


class StepTokens:
    """The engine's running histogram (written by the step thread only; read as a ``StepTokenCounts``)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(STEP_TOKEN_BUCKETS) + 1)
        self._total = 0

    def observe(self, tokens: int) -> None:
        """One step that handled ``tokens`` (a step that did nothing is not a step: it is not counted)."""
        if tokens <= 0:
            return
        self._counts[bisect.bisect_left(STEP_TOKEN_BUCKETS, tokens)] += 1
        self._total += tokens

    def reading(self) -> StepTokenCounts:
        return StepTokenCounts(tuple(self._counts), self._total)
