"""A prefill group: the sequences admitted together, prefilled a chunk at a time in every model they use.

    group = PrefillGroup(sequences, runners, vocab_size, device)   # one PrefillJob per model in use
    group.advance(budget)            # a chunk of every job; chunk logits feed the prompt scores
    group.complete -> group.first_contributions(sequences)  # each model's logits after each prompt's last token
    group.cache_prompts()            # their prompts' full blocks into each model's prefix cache
    group.hand_over(survivors)       # their prompts' KV into the runners' slots

Jobs of a group with prompt scores are kept column-aligned (``_aligned_columns``), so a scored position is
reached by every model in the same step and ``PromptScores`` holds one chunk, never the whole prompt.
"""

from __future__ import annotations

import torch

from proxy_engine.combine import Contribution
from proxy_engine.prompt_scores import PromptScores
from proxy_engine.runner import ModelRunner, PrefillJob
from proxy_engine.sequence import Sequence


class PrefillGroup:
    """Sequences being prefilled together: one job per model that any of them uses, and their prompt scores."""

    def __init__(
        self, sequences: list[Sequence], runners: list[ModelRunner], vocab_size: int, device: torch.device
    ) -> None:
        self.sequences = sequences
        self._generated = [len(s.output_ids) for s in sequences]  # before this prefill (a resumed one's output)
        self.runners = runners
        self.vocab_size = vocab_size
        self.device = device
        self.jobs: dict[int, PrefillJob] = {}
        for index, runner in enumerate(runners):
            members = [s for s in sequences if index in s.prompts]
            if members:
                prompts = [s.context_ids(index) for s in members]  # a resumed sequence's output too
                reuse = [s.reuses_cache for s in members]
                salts = [s.cache_salt for s in members]
                self.jobs[index] = runner.start_prefill([s.seq_id for s in members], prompts, reuse, salts)
        self.scores: dict[int, PromptScores] = {}  # seq_id -> its prompt logprobs, for the sequences that asked
        shared: dict[tuple, PromptScores] = {}  # a request's n choices score their one prompt once
        for sequence in sequences:
            k = sequence.params.prompt_logprobs
            if k is None or sequence.resumed:  # scored at its first prefill
                continue
            prompt = sequence.prompts[sequence.runners[0]]
            key = (tuple(prompt), tuple(sequence.weights), k)
            if key not in shared:
                shared[key] = PromptScores(prompt, sequence.runners, k, vocab_size, device)
            self.scores[sequence.seq_id] = shared[key]

    def took_tokens(self) -> bool:
        """Whether a sequence of the group has taken a token since the group began (or finished)."""
        return any(s.finished or len(s.output_ids) != n for s, n in zip(self.sequences, self._generated))

    @property
    def complete(self) -> bool:
        return all(job.complete for job in self.jobs.values())

    def advance(self, budget: int) -> None:
        """Prefill about ``budget`` prompt tokens in every job (rows x columns); chunks feed the prompt scores."""
        columns = self._aligned_columns(budget) if self.scores else {}
        for index, job in self.jobs.items():
            self._chunk(index, job, budget, columns.get(index))

    def _aligned_columns(self, budget: int) -> dict[int, int]:
        """Columns per job this step such that every job has as many columns left as the others (or none).

        Prompts are right-aligned in every job, so equal columns left means a scored prompt's position p is
        reached by every model in the same step: its ``PromptScores`` then holds one chunk of positions, where
        jobs moving at their own pace (fewer rows, faster) could leave it holding most of the prompt.
        """
        step = max(1, budget // max(job.ids.shape[0] for job in self.jobs.values()))
        left = {index: job.ids.shape[1] - job.done for index, job in self.jobs.items()}
        target = max(0, max(left.values()) - step)
        return {index: max(0, remaining - target) for index, remaining in left.items()}

    def _chunk(self, index: int, job: PrefillJob, budget: int, columns: int | None) -> None:
        """One chunk of one model's prefill; the chunk's logits go to the prompt scores that want them."""
        scorers = [i for i, seq_id in enumerate(job.seq_ids) if seq_id in self.scores]
        scored_rows = sorted({job.row_of[i] for i in scorers})
        first_column = job.done
        self.runners[index].prefill_step(job, budget, scored_rows, columns)
        if not scored_rows or job.chunk_logits is None:
            return
        width = job.ids.shape[1]
        weights = {s.seq_id: s.weights[index] for s in self.sequences}
        added: set[int] = set()
        for i in scorers:
            scores = self.scores[job.seq_ids[i]]
            if id(scores) in added:  # shared by sequences with the same prompt and weights
                continue
            added.add(id(scores))
            logits = job.chunk_logits[scored_rows.index(job.row_of[i])]
            pad = width - len(scores.prompt)  # rows are left-padded to the job's longest prompt
            scores.add(index, first_column - pad, logits, weights[job.seq_ids[i]])
        job.chunk_logits = None

    def cached_tokens(self, sequence: Sequence) -> int:
        """The sequence's prompt tokens read from the prefix cache, in the model that reports its usage."""
        job = self.jobs.get(sequence.runners[0])
        return 0 if job is None else job.cached_tokens(sequence.seq_id)

    def first_contributions(self, sequences: list[Sequence]) -> dict[int, Contribution]:
        """Each model's logits after the last prompt token of each sequence (by runner index; ``Contribution``
        rows index ``sequences``): ``combine`` them for the first token."""
        position = {s.seq_id: row for row, s in enumerate(sequences)}
        by_id = {s.seq_id: s for s in sequences}
        parts: dict[int, Contribution] = {}
        for index, job in self.jobs.items():
            keep = [i for i, seq_id in enumerate(job.seq_ids) if seq_id in position]
            if not keep:
                continue
            members = [by_id[job.seq_ids[i]] for i in keep]
            picked = torch.tensor([job.row_of[i] for i in keep], dtype=torch.long, device=job.last_logits.device)
            rows, weights = [position[s.seq_id] for s in members], [s.weights[index] for s in members]
            parts[index] = Contribution.of(job.last_logits[picked], rows, weights)
        return parts

    def cache_prompts(self) -> None:
        """Add the complete jobs' prompts to their models' prefix caches (a group dropped mid-prefill adds
        nothing: its jobs never complete)."""
        for index, job in self.jobs.items():
            self.runners[index].cache_prompts(job)

    def hand_over(self, survivors: list[Sequence]) -> None:
        """Give each survivor a slot, with a copy of its prompt's cache, in every runner it uses.

        All or nothing: if one runner fails (out of memory in the third model, say), the rows already added
        to the others are taken out again before the error propagates, so that no runner holds a row the
        others lack and the running batch decodes on as before.
        """
        survivor_ids = {s.seq_id for s in survivors}
        done: list[tuple[int, list[int]]] = []  # (runner index, its rows before)
        try:
            for index, job in self.jobs.items():
                keep = [i for i, seq_id in enumerate(job.seq_ids) if seq_id in survivor_ids]
                before = list(self.runners[index].seq_ids)
                self.runners[index].add_rows(job, keep)
                done.append((index, before))
        except BaseException:
            for index, before in done:
                self.runners[index].keep_rows(before)
            raise
