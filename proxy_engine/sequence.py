"""One choice of one request, as the engine tracks it from the waiting queue to its last token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from proxy_engine.request import FinishReason, RequestTimings, SamplingParams

if TYPE_CHECKING:  # annotations only
    import torch

    from proxy_engine.detokenizer import IncrementalDetokenizer
    from proxy_engine.grammar import GrammarMatcher
    from proxy_engine.thinking_budget import ThinkingBudget


class Status(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, kw_only=True)
class Sequence:
    """``weights[m]`` is runner m's weight in this sequence's logits; runners with weight 0 never see it."""

    seq_id: int
    request_id: str
    index: int  # the choice index (n > 1)
    params: SamplingParams
    weights: list[float]
    # runner index -> that model's prompt ids: the runners with weight != 0 (every runner with model_logprobs)
    prompts: dict[int, list[int]]
    max_tokens: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator
    eos_ids: frozenset[int]
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    grammar: GrammarMatcher | None = None  # the output's constraint, advanced with every accepted token
    cache_salt: str | None = None  # its prompt's prefix-cache salt (PromptInput.cache_salt)
    bad_word_ids: tuple[tuple[int, ...], ...] = ()  # params.bad_words as token sequences (bad_words.py)
    preemptions: int = 0  # times its K/V was dropped (a more urgent sequence, out of memory): it resumes by recomputing
    thinking: ThinkingBudget | None = None  # params.thinking_token_budget's count, and the closing tag it forces
    pair: int | None = None  # the expert pair its model id names alone (Target.pair), None: the default combination
    replay: tuple[int, ...] | None = None  # the tokens it writes, whatever is drawn (SamplingParams.replay)
    scheduled_at: float | None = None  # time.monotonic() at its first prefill (a preempted one's resumption aside)
    first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def start_prefill(self) -> None:
        self.status = Status.PREFILLING
        if self.scheduled_at is None:
            self.scheduled_at = time.monotonic()

    def start_running(self) -> None:
        self.status = Status.RUNNING

    def preempt(self) -> None:
        """Back to waiting, its K/V given up: it resumes by prefilling its prompt and its output so far."""
        self.status = Status.WAITING
        self.preemptions += 1

    def defer(self) -> None:
        """Back to waiting from a prefill that could not complete (out of memory): prefilled again as if new."""
        self.status = Status.WAITING

    @property
    def resumed(self) -> bool:
        """Preempted before: its next prefill recomputes K/V (its prompt was scored and counted already)."""
        return self.preemptions > 0

    @property
    def reuses_cache(self) -> bool:
        """Whether its prefill may start on cached columns: not a prompt scored position by position (prompt
        logprobs need every position's logits), unless it was scored already (resumed)."""
        return self.params.prompt_logprobs is None or self.resumed

    def forced_token(self) -> int | None:
        """The one token it may write next, if any: its replay's next, or its thinking budget's closing tag."""
        if self.replay is not None:
            written = len(self.output_ids)
            return self.replay[written] if written < len(self.replay) else None
        return self.thinking.forced() if self.thinking is not None else None

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error

    def timings(self, now: float) -> RequestTimings:
        """Its time in the queue, in prefill and in decode, as of ``now`` (its end)."""
        scheduled = self.scheduled_at if self.scheduled_at is not None else now
        first = self.first_token_at if self.first_token_at is not None else now
        return RequestTimings(queued_s=scheduled - self.arrival, prefill_s=max(0.0, first - scheduled),
                              decode_s=max(0.0, now - first))

    @property
    def runners(self) -> list[int]:
        return sorted(self.prompts)

    def context_ids(self, runner: int) -> list[int]:
        """What runner ``runner``'s K/V must hold before the next token: its prompt, then the tokens generated so
        far (none, unless the sequence was preempted)."""
        return self.prompts[runner] + self.output_ids

    @property
    def primary_prompt_len(self) -> int:
        """The prompt length reported as usage: the first model that runs this sequence (the base, usually)."""
        return len(self.prompts[self.runners[0]])

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def stop_ids(self) -> set[int]:
        ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            ids |= self.eos_ids
        return ids

    def banned_ids(self) -> list[int]:
        """Ids that may not end the sequence yet (``min_tokens``)."""
        if len(self.output_ids) >= self.params.min_tokens:
            return []
        return sorted(self.stop_ids())
