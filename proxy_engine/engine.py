"""The step loop: decode every running row in all models, combine, sample; prefill newcomers within budget.

    outputs = engine.step()   # aborts -> decode + combine + sample -> prefill a chunk -> outputs

``ProxyEngine`` is synchronous and owns every tensor; ``AsyncEngine`` (async_engine.py) runs it in a thread.
Requests and aborts arrive through a locked inbox drained at the start of each step, so a new request joins
the batch at the next step and an aborted one leaves at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

import torch

from proxy_engine.combine import Contribution, combine
from proxy_engine.config import EngineConfig
from proxy_engine.detokenizer import IncrementalDetokenizer, token_bytes
from proxy_engine.grammar import GrammarCompiler, apply_grammar_masks
from proxy_engine.loader import LoadedModel, eos_token_ids
from proxy_engine.prompt_scores import PromptScores
from proxy_engine.request import (
    EngineOverloadedError,
    FinishReason,
    PromptInput,
    RequestOutput,
    SamplingParams,
    Target,
    TokenLogprob,
    TopLogprob,
)
from proxy_engine.runner import ModelRunner, PrefillJob
from proxy_engine.sampler import (
    apply_logit_bias,
    apply_penalties,
    ban_tokens,
    filter_top_k_top_p_min_p,
    sample,
    top_logprobs,
)
from proxy_engine.scheduler import Scheduler
from proxy_engine.sequence import Sequence, Status
from proxy_engine.tool_calls import detect_format

log = logging.getLogger("proxy_engine.engine")


def resolve_tool_call_format(config: EngineConfig, models: list[LoadedModel]) -> str:
    """The configured tool-call format, or (``auto``) the one the chat templates write: a chat-format model's
    template first (the expert's, usually), then any tokenizer's."""
    if config.tool_call_format != "auto":
        return config.tool_call_format
    templates = [m.renderer.chat_template for m in models if m.renderer.prompt_format == "chat"]
    templates += [m.renderer.chat_template for m in models]
    return detect_format(next((t for t in templates if t), None))


@dataclass(eq=False)
class PrefillGroup:
    """Sequences being prefilled together: one job per model that any of them uses."""

    sequences: list[Sequence]
    jobs: dict[int, PrefillJob]
    scores: dict[int, PromptScores]  # seq_id -> its prompt logprobs, for the sequences that asked

    @property
    def complete(self) -> bool:
        return all(job.complete for job in self.jobs.values())


class ProxyEngine:
    """Three (or more) models in lockstep over one continuously batched set of sequences."""

    def __init__(self, models: list[LoadedModel], config: EngineConfig) -> None:
        self.config = config
        self.models = models
        self.tokenizer = models[0].tokenizer
        self.vocab_size = models[0].vocab_size or len(self.tokenizer)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.runners = [ModelRunner(m.model, self.vocab_size, pad_id, m.role) for m in models]
        cap = config.limits.max_model_len or 10**9
        self.max_lens = [min(m.max_len, cap) for m in models]
        self.eos_ids = frozenset(eos_token_ids(models))
        # Structured outputs: compiled where prompts render (off the step thread), cached by constraint.
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
        self.tool_call_format = resolve_tool_call_format(config, models)
        for model in models:
            model.renderer.tool_format = self.tool_call_format
        self.device = self.runners[0].device
        self.scheduler = Scheduler(config.limits)
        self.running: list[Sequence] = []
        self.prefill: PrefillGroup | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._next_seq_id = 0
        self._seed_rng = random.Random(config.seed)
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, list[int]] = {}
        # Tests inject faults here: called with the sequences of a phase ("decode", "prefill", "sample").
        self.fault_hook = None
        # Analysis mode (as in the research code): called with (sequences, combined logits [B, V]) every step.
        self.logits_hook = None

    # --- requests in ---------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return min(self.max_lens)

    @property
    def num_pairs(self) -> int:
        return len(self.config.experts)

    def weights_for(self, params: SamplingParams, target: Target) -> list[float]:
        """Each runner's weight: base 1, expert_i +alpha_i, anti_i -alpha_i (or one model alone)."""
        weights = [0.0] * len(self.runners)
        if target is Target.EXPERT:
            if not self.num_pairs:
                raise ValueError("this deployment has no expert to serve alone")
            weights[1] = 1.0
            return weights
        weights[0] = 1.0
        if target is Target.PROXY:
            for i, alpha in enumerate(params.resolve_alphas(self.config.default_alphas)):
                weights[1 + 2 * i], weights[2 + 2 * i] = alpha, -alpha
        return weights

    def render(self, prompt: PromptInput, target: Target = Target.PROXY) -> list[int]:
        """The primary model's prompt ids (the base, or the expert when it is served alone)."""
        index = 1 if target is Target.EXPERT else 0
        return self.models[index].renderer.render(prompt)

    def make_sequences(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        target: Target = Target.PROXY,
        first_index: int = 0,
    ) -> list[Sequence]:
        """Validate and render a request into its ``n`` sequences; ``ValueError`` says what is wrong.

        Their choice indices start at ``first_index`` (a request with several prompts numbers prompt ``i``'s
        choices from ``i * n``, as OpenAI does).
        """
        params.validate(self.vocab_size, self.num_pairs)
        if prompt.token_ids is not None and any(not 0 <= t < self.vocab_size for t in prompt.token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        weights = self.weights_for(params, target)
        prompts: dict[int, list[int]] = {}
        context_left = params.max_tokens if params.max_tokens is not None else 10**9
        for index, weight in enumerate(weights):
            if weight == 0.0:
                continue
            ids = self.models[index].renderer.render(prompt)
            limit = self.max_lens[index]
            # A prompt may fill the whole context only when nothing is to follow it (max_tokens 0: scoring).
            if len(ids) > limit or (len(ids) == limit and params.max_tokens != 0):
                raise ValueError(
                    f"This model's maximum context length is {limit} tokens, but the prompt is {len(ids)} tokens "
                    f"as the {self.models[index].role} model sees it; shorten the prompt"
                )
            prompts[index] = ids
            context_left = min(context_left, limit - len(ids))
        if params.prompt_logprobs is not None:
            self._check_scorable(prompts)
        if params.min_tokens > context_left:
            raise ValueError(f"min_tokens ({params.min_tokens}) exceeds the context left ({context_left} tokens)")
        deadline = None
        if self.config.limits.request_timeout_s:
            deadline = time.monotonic() + self.config.limits.request_timeout_s
        sequences = []
        stops = list(params.stop)
        structured = params.structured
        if structured is not None:
            self.grammars.matcher(structured)  # compile (or find cached) once: a bad constraint is a ValueError
        for choice in range(first_index, first_index + params.n):
            seed = params.seed + choice if params.seed is not None else self._seed_rng.getrandbits(63)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, stops, params.include_stop_str_in_output, params.skip_special_tokens
            )
            with self._lock:
                seq_id = self._next_seq_id
                self._next_seq_id += 1
            sequences.append(
                Sequence(seq_id, request_id, choice, params, weights, prompts, context_left, detokenizer,
                         generator, self.eos_ids, deadline=deadline,
                         grammar=self.grammars.matcher(structured) if structured is not None else None)
            )
        return sequences

    def _check_scorable(self, prompts: dict[int, list[int]]) -> None:
        """Prompt logprobs need every model of the request to read the same tokens (a chat-format model reads
        its template around them: its position p is not the others' position p)."""
        for index in prompts:
            model = self.models[index]
            if model.renderer.prompt_format != "plain":
                raise ValueError(
                    f"prompt logprobs (echo with logprobs) need every model to see the prompt as plain text; the "
                    f"{model.role} model uses its chat format (its positions are not the base's). Score with the "
                    f"base alone, or serve the pair with prompt_format: plain"
                )
        if len({tuple(ids) for ids in prompts.values()}) > 1:
            raise ValueError("prompt logprobs need the models to tokenize the prompt alike, and they do not")

    def add(self, sequences: list[Sequence]) -> None:
        """Queue sequences (any thread); ``EngineOverloadedError`` when the waiting queue is full."""
        with self._lock:
            queued = len(self.scheduler.waiting) + len(self._inbox)
            if not self.scheduler.has_room_for(len(sequences), queued, len(self.running) + self.num_prefilling):
                raise EngineOverloadedError(
                    f"the server is at capacity ({self.config.limits.max_waiting} requests waiting); retry shortly"
                )
            self._inbox.extend(sequences)

    def abort(self, request_id: str) -> None:
        """Abort every sequence of a request (any thread); takes effect at the next step."""
        with self._lock:
            self._aborts.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    @property
    def num_prefilling(self) -> int:
        return len(self.prefill.sequences) if self.prefill else 0

    def has_work(self) -> bool:
        return bool(self.running or self.prefill or self.scheduler.waiting or self._inbox or self._aborts)

    # --- the step ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        self._drain_inbox(outputs)
        if self.running:
            outputs += self._guarded("decode", self.running, self._decode)
        if self.prefill is None:
            admitted = self.scheduler.admit(len(self.running))
            if admitted:
                self.prefill = self._start_prefill(admitted)
        if self.prefill is not None:
            outputs += self._guarded("prefill", self.prefill.sequences, self._prefill_step)
        return outputs

    def _guarded(self, phase: str, sequences: list[Sequence], run) -> list[RequestOutput]:
        """Run a batch phase; if it raises, fail the sequences it concerns and keep serving the rest."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(phase, sequences)
            return run()
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the engine
            log.exception("engine %s step failed for %d sequences", phase, len(sequences))
            failed = [s for s in sequences if s.status is not Status.FINISHED]
            if phase == "prefill":
                self.prefill = None
            else:
                self.running = [s for s in self.running if s not in failed]
                self._sync_rows()
            message = f"internal error during {phase}: {type(error).__name__}"
            return [self._finish(s, FinishReason.ERROR, error=message, error_code="internal_error") for s in failed]

    def _drain_inbox(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        self.scheduler.add(inbox)
        now = time.monotonic()
        expired = {s.request_id for s in self._all_active() if s.deadline is not None and now > s.deadline}
        if not aborts and not expired:
            return
        for sequence in self.scheduler.remove(lambda s: s.request_id in aborts or s.request_id in expired):
            outputs.append(self._end_early(sequence, aborts))
        if self.prefill is not None:
            doomed = [s for s in self.prefill.sequences if s.request_id in aborts or s.request_id in expired]
            for sequence in doomed:
                outputs.append(self._end_early(sequence, aborts))
            if doomed and all(s.status is Status.FINISHED for s in self.prefill.sequences):
                self.prefill = None
        leaving = [s for s in self.running if s.request_id in aborts or s.request_id in expired]
        if leaving:
            for sequence in leaving:
                outputs.append(self._end_early(sequence, aborts))
            self.running = [s for s in self.running if s.status is not Status.FINISHED]
            self._sync_rows()

    def _end_early(self, sequence: Sequence, aborts: set[str]) -> RequestOutput:
        if sequence.request_id in aborts:
            return self._finish(sequence, FinishReason.ABORT)
        timeout = self.config.limits.request_timeout_s
        return self._finish(
            sequence, FinishReason.ERROR, error=f"the request timed out after {timeout:g}s", error_code="timeout"
        )

    def _all_active(self) -> list[Sequence]:
        prefilling = self.prefill.sequences if self.prefill else []
        return [*self.scheduler.waiting, *prefilling, *self.running]

    def _sync_rows(self) -> None:
        """Make every runner hold exactly the running sequences that use it, in running order."""
        for index, runner in enumerate(self.runners):
            runner.keep_rows([s.seq_id for s in self.running if index in s.prompts])

    # --- decode ----------------------------------------------------------------------------------------------
    def _decode(self) -> list[RequestOutput]:
        sequences = self.running
        position = {s.seq_id: row for row, s in enumerate(sequences)}
        by_id = {s.seq_id: s for s in sequences}
        parts = []
        # Launch every model before reading any result: on GPUs the forwards overlap.
        for index, runner in enumerate(self.runners):
            if runner.num_rows == 0:
                continue
            members = [by_id[seq_id] for seq_id in runner.seq_ids]
            tokens = torch.tensor([s.last_token for s in members], dtype=torch.long)
            parts.append(self._contribution(index, members, position, runner.decode(tokens)))
        combined = combine(len(sequences), self.vocab_size, parts, self.device)
        outputs = self._sample_and_emit(sequences, combined)
        finished = [s for s in sequences if s.status is Status.FINISHED]
        if finished:
            self.running = [s for s in sequences if s.status is not Status.FINISHED]
            self._sync_rows()
        return outputs

    # --- prefill ---------------------------------------------------------------------------------------------
    def _start_prefill(self, sequences: list[Sequence]) -> PrefillGroup:
        jobs = {}
        for index, runner in enumerate(self.runners):
            members = [s for s in sequences if index in s.prompts]
            if members:
                jobs[index] = runner.start_prefill([s.seq_id for s in members], [s.prompts[index] for s in members])
        scores: dict[int, PromptScores] = {}
        shared: dict[tuple, PromptScores] = {}  # a request's n choices score their one prompt once
        for sequence in sequences:
            sequence.status = Status.PREFILLING
            k = sequence.params.prompt_logprobs
            if k is not None:
                prompt = sequence.prompts[sequence.runners[0]]
                key = (tuple(prompt), tuple(sequence.weights), k)
                if key not in shared:
                    shared[key] = PromptScores(prompt, sequence.runners, k, self.vocab_size, self.device)
                scores[sequence.seq_id] = shared[key]
        return PrefillGroup(sequences, jobs, scores)

    def _prefill_step(self) -> list[RequestOutput]:
        group = self.prefill
        assert group is not None
        # Running rows each cost one token this step; the rest of the budget goes to prompts.
        budget = max(16, self.config.limits.max_num_batched_tokens - len(self.running))
        columns = self._aligned_columns(group, budget) if group.scores else {}
        for index, job in group.jobs.items():
            self._prefill_chunk(group, index, job, budget, columns.get(index))
        if not group.complete:
            return []
        self.prefill = None
        alive = [s for s in group.sequences if s.status is not Status.FINISHED]
        if not alive:
            return []
        for sequence in alive:
            self.prompt_tokens_total += sequence.primary_prompt_len
        # max_tokens 0 (echo, scoring a prompt): the prompt is all there is.
        sampled = [s for s in alive if s.max_tokens > 0]
        emitted: dict[Sequence, RequestOutput] = {}
        if sampled:
            combined = self._combine_last(group, sampled)
            emitted.update(zip(sampled, self._sample_and_emit(sampled, combined)))
        scored: dict[int, list[TokenLogprob]] = {}
        for sequence in alive:
            if sequence.max_tokens == 0:
                emitted[sequence] = self._finish(sequence, FinishReason.LENGTH)
            scores = group.scores.get(sequence.seq_id)
            if scores is not None:
                if id(scores) not in scored:
                    scored[id(scores)] = self._prompt_logprobs(scores)
                emitted[sequence].prompt_logprobs = scored[id(scores)]
        outputs = [emitted[s] for s in alive]
        survivors = [s for s in alive if s.status is not Status.FINISHED]
        survivor_ids = {s.seq_id for s in survivors}
        for index, job in group.jobs.items():
            keep = [i for i, seq_id in enumerate(job.seq_ids) if seq_id in survivor_ids]
            self.runners[index].add_rows(job, keep)
        for sequence in survivors:
            sequence.status = Status.RUNNING
        self.running.extend(survivors)
        return outputs

    @staticmethod
    def _aligned_columns(group: PrefillGroup, budget: int) -> dict[int, int]:
        """Columns per job this step such that every job has as many columns left as the others (or none).

        Prompts are right-aligned in every job, so equal columns left means a scored prompt's position p is
        reached by every model in the same step: its ``PromptScores`` then holds one chunk of positions, where
        jobs moving at their own pace (fewer rows, faster) could leave it holding most of the prompt.
        """
        step = max(1, budget // max(job.ids.shape[0] for job in group.jobs.values()))
        left = {index: job.ids.shape[1] - job.done for index, job in group.jobs.items()}
        target = max(0, max(left.values()) - step)
        return {index: max(0, remaining - target) for index, remaining in left.items()}

    def _prefill_chunk(
        self, group: PrefillGroup, index: int, job: PrefillJob, budget: int, columns: int | None = None
    ) -> None:
        """One chunk of one model's prefill; the chunk's logits go to the prompt scores that want them."""
        scorers = [i for i, seq_id in enumerate(job.seq_ids) if seq_id in group.scores]
        scored_rows = sorted({job.row_of[i] for i in scorers})
        first_column = job.done
        self.runners[index].prefill_step(job, budget, scored_rows, columns)
        if not scored_rows or job.chunk_logits is None:
            return
        width = job.ids.shape[1]
        weights = {s.seq_id: s.weights[index] for s in group.sequences}
        added: set[int] = set()
        for i in scorers:
            scores = group.scores[job.seq_ids[i]]
            if id(scores) in added:  # shared by sequences with the same prompt and weights
                continue
            added.add(id(scores))
            logits = job.chunk_logits[scored_rows.index(job.row_of[i])]
            pad = width - len(scores.prompt)  # rows are left-padded to the job's longest prompt
            scores.add(index, first_column - pad, logits, weights[job.seq_ids[i]])
        job.chunk_logits = None

    def _combine_last(self, group: PrefillGroup, sequences: list[Sequence]) -> torch.Tensor:
        """``[len(sequences), V]``: the combined logits after the last prompt token of each sequence."""
        position = {s.seq_id: row for row, s in enumerate(sequences)}
        by_id = {s.seq_id: s for s in sequences}
        parts = []
        for index, job in group.jobs.items():
            keep = [i for i, seq_id in enumerate(job.seq_ids) if seq_id in position]
            if not keep:
                continue
            members = [by_id[job.seq_ids[i]] for i in keep]
            picked = torch.tensor([job.row_of[i] for i in keep], dtype=torch.long, device=job.last_logits.device)
            parts.append(self._contribution(index, members, position, job.last_logits[picked]))
        return combine(len(sequences), self.vocab_size, parts, self.device)

    @staticmethod
    def _contribution(
        index: int, members: list[Sequence], position: dict[int, int], logits: torch.Tensor
    ) -> Contribution:
        """Runner ``index``'s logits (one row per member, in order) placed at each member's batch row."""
        rows = torch.tensor([position[s.seq_id] for s in members], dtype=torch.long)
        weights = torch.tensor([s.weights[index] for s in members], dtype=torch.float32)
        return Contribution(rows, weights, logits)

    def _prompt_logprobs(self, scores: PromptScores) -> list[TokenLogprob]:
        first = scores.prompt[0]
        entries = [TokenLogprob(first, self.token_text(first), None, [], self.token_bytes(first))]
        for token, logprob, values, ids in zip(scores.targets, scores.chosen, scores.top_values, scores.top_ids):
            entries.append(self._token_logprob(token, logprob, ids, values))
        return entries

    # --- sampling and outputs --------------------------------------------------------------------------------
    def _sample_and_emit(self, sequences: list[Sequence], combined: torch.Tensor) -> list[RequestOutput]:
        """Process, sample and emit one token for each sequence (``combined [B, V]`` float32).

        If the batch fails (one request's bad value deep in a logit processor, say), every row is retried on
        its own, so only the rows that fail again end with an error.
        """
        try:
            chosen = self._choose(sequences, combined)
        except Exception as error:  # noqa: BLE001
            if len(sequences) == 1:
                raise
            log.warning("sampling a batch of %d failed (%s); retrying row by row", len(sequences), error)
            chosen = []
            for row, sequence in enumerate(sequences):
                try:
                    chosen += self._choose([sequence], combined[row : row + 1])
                except Exception as row_error:  # noqa: BLE001
                    log.exception("sampling failed for request %s", sequence.request_id)
                    chosen.append(row_error)
        outputs = []
        for sequence, choice in zip(sequences, chosen):
            if isinstance(choice, Exception):
                message = f"internal error during sampling: {type(choice).__name__}"
                outputs.append(self._finish(sequence, FinishReason.ERROR, error=message, error_code="internal_error"))
            else:
                outputs.append(self._advance(sequence, *choice))
        return outputs

    def _choose(
        self, sequences: list[Sequence], combined: torch.Tensor
    ) -> list[tuple[int, list[TokenLogprob] | None]]:
        """Each row's token and logprobs; touches no sequence state but the generators it draws from."""
        if self.fault_hook is not None:
            self.fault_hook("sample", sequences)
        if self.logits_hook is not None:
            self.logits_hook(sequences, combined)
        logits = self._process(sequences, combined)
        temperature = torch.tensor([s.params.temperature for s in sequences], dtype=torch.float32)
        tokens = sample(logits, temperature.to(logits.device), [s.generator for s in sequences]).tolist()
        want = [s.params.logprobs for s in sequences if s.params.logprobs is not None]
        if not want:
            return [(token, None) for token in tokens]
        chosen_lp, top_values, top_ids = top_logprobs(combined, torch.tensor(tokens, device=combined.device), max(want))
        chosen_lp, top_values, top_ids = chosen_lp.tolist(), top_values.tolist(), top_ids.tolist()
        choices = []
        for row, (sequence, token) in enumerate(zip(sequences, tokens)):
            logprobs = None
            if sequence.params.logprobs is not None:
                k = sequence.params.logprobs
                logprobs = [self._token_logprob(token, chosen_lp[row], top_ids[row][:k], top_values[row][:k])]
            choices.append((token, logprobs))
        return choices

    def _process(self, sequences: list[Sequence], combined: torch.Tensor) -> torch.Tensor:
        params = [s.params for s in sequences]
        needs_bias = any(p.logit_bias for p in params)
        banned = [s.banned_ids() for s in sequences]
        needs_penalty = any(
            p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params
        )
        sampled = [p for p in params if not p.greedy]
        needs_filter = any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sampled)
        constrained = any(s.grammar is not None for s in sequences)
        if not (needs_bias or any(banned) or needs_penalty or needs_filter or constrained):
            return combined
        logits = combined.clone()
        device = logits.device
        if constrained:
            # First, like vLLM's bitmask: what the grammar forbids is out before any other processor sees it.
            apply_grammar_masks(logits, [s.grammar for s in sequences], [sorted(s.stop_ids()) for s in sequences],
                                self.grammars.mask_words)
        if needs_bias:
            apply_logit_bias(logits, [{int(k): float(v) for k, v in (p.logit_bias or {}).items()} for p in params])
        if any(banned):
            ban_tokens(logits, banned)
        if needs_penalty:
            counts = torch.zeros_like(logits)
            prompt_mask = torch.zeros(logits.shape, dtype=torch.bool, device=device)
            for row, sequence in enumerate(sequences):
                if sequence.output_ids:
                    ids = torch.tensor(sequence.output_ids, dtype=torch.long, device=device)
                    counts[row].index_add_(0, ids, torch.ones(len(ids), device=device))
                if sequence.params.repetition_penalty != 1.0:
                    prompt_mask[row, sequence.prompts[sequence.runners[0]]] = True
            tensor = lambda name: torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)  # noqa: E731
            logits = apply_penalties(
                logits, counts, prompt_mask,
                tensor("presence_penalty"), tensor("frequency_penalty"), tensor("repetition_penalty"),
            )
        if needs_filter:
            top_k = torch.tensor([p.top_k if p.top_k > 0 else 0 for p in params], dtype=torch.long, device=device)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
            logits = filter_top_k_top_p_min_p(logits, top_k, top_p, min_p)
        return logits

    def _advance(self, sequence: Sequence, token: int, logprobs: list[TokenLogprob] | None) -> RequestOutput:
        sequence.output_ids.append(token)
        self.generation_tokens_total += 1
        if token in sequence.stop_ids():
            return self._finish(sequence, FinishReason.STOP, new_token=token, logprobs=logprobs)
        grammar_done = False
        if sequence.grammar is not None:
            if not sequence.grammar.accept(token):
                return self._finish(sequence, FinishReason.ERROR, new_token=token, logprobs=logprobs,
                                    error=f"the output left its grammar: {sequence.grammar.error}",
                                    error_code="internal_error")
            # A complete output (a finite schema's closing brace) ends here: nothing else may follow it.
            grammar_done = sequence.grammar.finished
        # Like vLLM, stop strings only count once min_tokens are out (EOS and stop ids are banned until then).
        step = sequence.detokenizer.add(token, check_stops=len(sequence.output_ids) >= sequence.params.min_tokens)
        if step.stopped or grammar_done:
            return self._finish(sequence, FinishReason.STOP, new_token=token, logprobs=logprobs, text=step.delta)
        if len(sequence.output_ids) >= sequence.max_tokens:
            return self._finish(sequence, FinishReason.LENGTH, new_token=token, logprobs=logprobs, text=step.delta)
        return RequestOutput(
            sequence.request_id, sequence.index, [token], step.delta, None, logprobs,
            sequence.primary_prompt_len, len(sequence.output_ids),
        )

    def _finish(
        self,
        sequence: Sequence,
        reason: FinishReason,
        *,
        new_token: int | None = None,
        logprobs: list[TokenLogprob] | None = None,
        text: str = "",
        error: str | None = None,
        error_code: str | None = None,
    ) -> RequestOutput:
        sequence.status = Status.FINISHED
        sequence.finish_reason = reason
        sequence.error = error
        if reason is not FinishReason.ERROR:
            text += sequence.detokenizer.finish()
        return RequestOutput(
            sequence.request_id, sequence.index, [new_token] if new_token is not None else [], text, reason,
            logprobs, sequence.primary_prompt_len, len(sequence.output_ids), error, error_code,
        )

    def _token_logprob(self, token: int, logprob: float, top_ids: list[int], top_values: list[float]) -> TokenLogprob:
        top = [TopLogprob(i, self.token_text(i), v, self.token_bytes(i)) for i, v in zip(top_ids, top_values)]
        return TokenLogprob(token, self.token_text(token), logprob, top, self.token_bytes(token))

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = list(token_bytes(self.tokenizer, token_id))
            self._token_bytes[token_id] = raw
        return raw
