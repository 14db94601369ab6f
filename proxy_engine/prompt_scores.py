"""Prompt logprobs: the combined distribution's log-probability of every prompt token, from the prefill.

What ``echo`` with ``logprobs`` returns and what evaluation harnesses score multiple-choice answers with. The
combination is linear, so each model adds ``weight * logits`` of its prefill chunks into one buffer per
sequence; a position becomes log-probabilities as soon as every model of the sequence has reached it, so
the buffer holds only the positions between the slowest and the fastest model. The engine keeps the jobs of
a group with scores in step (``PrefillGroup._aligned_columns``): that is one chunk, never ``[prompt, V]``.
"""

from __future__ import annotations

import torch

from proxy_engine.sampler import top_logprobs


class PromptScores:
    """One sequence's prompt logprobs as its models' prefill chunks arrive (all models see the same ids)."""

    def __init__(self, prompt: list[int], runners: list[int], k: int, vocab_size: int, device: torch.device) -> None:
        self.prompt = list(prompt)
        self.targets = self.prompt[1:]  # position p predicts token p + 1; the last one predicts the output
        self.k = k
        self.start = 0  # the first position not yet turned into log-probabilities
        self.reached = dict.fromkeys(runners, 0)  # per runner: positions [0, reached) added
        self.window = torch.zeros((0, vocab_size), dtype=torch.float32, device=device)  # positions start..
        self.chosen: list[float] = []
        self.top_values: list[list[float]] = []
        self.top_ids: list[list[int]] = []
        self.ranks: list[int] = []  # of each target (vLLM's prompt_logprobs report it)

    @property
    def complete(self) -> bool:
        return self.start >= len(self.targets)

    def add(self, runner: int, first_position: int, logits: torch.Tensor, weight: float) -> None:
        """Add ``weight * logits`` (``[columns, V]``) for positions ``first_position ..`` (negative: padding)."""
        end = min(first_position + logits.shape[0], len(self.targets))
        low = max(first_position, self.start)
        if end > low:
            if self.window.shape[0] < end - self.start:
                grow = end - self.start - self.window.shape[0]
                self.window = torch.cat([self.window, self.window.new_zeros((grow, self.window.shape[1]))])
            chunk = logits[low - first_position : end - first_position].to(self.window.device, torch.float32)
            self.window[low - self.start : end - self.start].add_(chunk, alpha=weight)
        self.reached[runner] = max(self.reached[runner], end)
        self._finalize()

    def _finalize(self) -> None:
        ready = min(self.reached.values())
        if ready <= self.start:
            return
        count = ready - self.start
        targets = torch.tensor(self.targets[self.start : ready], dtype=torch.long, device=self.window.device)
        window = self.window[:count]
        chosen, values, ids = top_logprobs(window, targets, self.k)
        # log-softmax keeps the order: the rank is read from the combined logits themselves
        self.ranks += ((window > window.gather(1, targets[:, None])).sum(dim=1) + 1).tolist()
        self.chosen += chosen.tolist()
        self.top_values += values.tolist()
        self.top_ids += ids.tolist()
        self.window = self.window[count:].clone() if self.window.shape[0] > count else self.window[:0]
        self.start = ready
