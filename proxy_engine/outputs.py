"""From chosen tokens to ``RequestOutput`` deltas: detokenizing, stop checks, finishing, logprob entries.

The builder owns everything text-side of a sequence's life: it makes each sequence's incremental detokenizer,
caches every token's raw bytes (the same few thousand ids recur in every logprobs answer), and turns a token
into the step's output (``advance``) or a sequence's last one (``finish``).

Token texts follow the text rule (docs/text.md): a logprobs entry's ``token`` is the text that token added to
the completion (so the entries join to the text and ``text_offset`` stays true), and its alternatives are
rendered in the same context, each key distinct (``IncrementalDetokenizer.render``).
"""

from __future__ import annotations

import time

from proxy_engine.analysis import PROXY_ROLE, Distribution
from proxy_engine.detokenizer import IncrementalDetokenizer, token_bytes
from proxy_engine.device_memory import out_of_memory
from proxy_engine.kv_budget import KVBudgetExceeded
from proxy_engine.prompt_scores import PromptScores
from proxy_engine.request import (
    ErrorCode,
    FinishReason,
    ModelLogprobs,
    NoTokenAllowedError,
    RequestOutput,
    SamplingParams,
    TokenAnalysis,
    TokenLogprob,
    TopLogprob,
)
from proxy_engine.sequence import Sequence


class OutputBuilder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.generation_tokens_total = 0
        self._token_bytes: dict[int, list[int]] = {}

    def detokenizer(self, params: SamplingParams, prompt_ids: list[int] | None = None) -> IncrementalDetokenizer:
        """``prompt_ids``: the primary model's prompt, the context of the first generated tokens."""
        return IncrementalDetokenizer(
            self.tokenizer, list(params.stop), params.include_stop_str_in_output, params.skip_special_tokens,
            prompt_ids=prompt_ids,
        )

    # --- a sequence's outputs --------------------------------------------------------------------------------
    def advance(
        self, sequence: Sequence, token: int, logprobs: list[TokenLogprob] | None,
        analysis: list[TokenAnalysis] | None = None,
    ) -> RequestOutput:
        """Append ``token`` and say what the client gets: a text delta, or the end (stop id or string, length).
        ``logprobs`` and ``analysis`` (per-model logprobs) are the token's entries, if asked for."""
        sequence.output_ids.append(token)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.monotonic()
        self.generation_tokens_total += 1
        entries = Entries(logprobs, analysis)
        if token in sequence.stop_ids():
            # A stop id adds nothing to the text; its entry shows the token decoded alone (``<|eot_id|>``), as
            # vLLM's does, so clients can tell which token ended the sequence.
            entries.name(self.tokenizer.decode([token]))
            # vLLM's stop_reason: the id when one of the request's stop_token_ids ended it, None for EOS.
            by_eos = token in sequence.eos_ids and not sequence.params.ignore_eos
            return self.finish(sequence, FinishReason.STOP, new_token=token, entries=entries,
                               stop_reason=None if by_eos else token)
        complete = False
        if sequence.grammar is not None:
            if not sequence.grammar.accept(token):
                return self.finish(sequence, FinishReason.ERROR, new_token=token, entries=entries,
                                   error=f"the output left its grammar: {sequence.grammar.error}",
                                   error_code=ErrorCode.INTERNAL_ERROR)
            # A complete output (a finite schema's closing brace) ends here: nothing else may follow it.
            complete = sequence.grammar.finished
        # Like vLLM, stop strings only count once min_tokens are out (EOS and stop ids are banned until then).
        step = sequence.detokenizer.add(token, check_stops=len(sequence.output_ids) >= sequence.params.min_tokens)
        entries.name(step.token_text)
        if step.stopped or complete:
            return self.finish(sequence, FinishReason.STOP, new_token=token, entries=entries, text=step.delta,
                               stop_reason=step.stop)
        if len(sequence.output_ids) >= sequence.max_tokens:
            return self.finish(sequence, FinishReason.LENGTH, new_token=token, entries=entries, text=step.delta)
        if sequence.thinking is not None:
            sequence.thinking.observe(sequence.detokenizer.text, len(sequence.output_ids),
                                      sequence.detokenizer.settled)
        return self._output(sequence, [token], step.delta, entries=entries)

    def finish(
        self,
        sequence: Sequence,
        reason: FinishReason,
        *,
        new_token: int | None = None,
        entries: Entries | None = None,
        text: str = "",
        error: str | None = None,
        error_code: ErrorCode | None = None,
        stop_reason: int | str | None = None,
    ) -> RequestOutput:
        """End ``sequence`` (the held-back text is released unless it failed) and build its last output;
        ``stop_reason``: the stop string or stop token id that ended it (vLLM's)."""
        sequence.finish(reason, error)
        entries = entries or Entries()
        if reason is not FinishReason.ERROR:
            text += sequence.detokenizer.finish()
            if new_token is not None:
                entries.extend_last(sequence.detokenizer.flushed)
        new_tokens = [new_token] if new_token is not None else []
        output = self._output(sequence, new_tokens, text, reason, entries, error, error_code)
        output.stop_reason = stop_reason
        output.timings = sequence.timings(time.monotonic())
        return output

    def fail(self, sequence: Sequence, phase: str, error: BaseException) -> RequestOutput:
        if isinstance(error, NoTokenAllowedError):  # the request's fault, in our own words
            return self.finish(sequence, FinishReason.ERROR, error=str(error), error_code=ErrorCode.NO_TOKEN_ALLOWED)
        # The error's own text stays in the server's log: it may name paths, shapes or another request's data.
        message = f"internal error during {phase}: {type(error).__name__}"
        if isinstance(error, KVBudgetExceeded):  # our own text: sizes and the flag, nothing of another request
            message = f"out of K/V memory during {phase}: {error} (a shorter prompt or fewer choices may fit)"
        elif out_of_memory(error):
            message = (f"out of memory during {phase} ({type(error).__name__}): the request does not fit in the "
                       "memory the server has left (a shorter prompt or fewer choices may)")
        return self.finish(sequence, FinishReason.ERROR, error=message, error_code=ErrorCode.INTERNAL_ERROR)

    @staticmethod
    def _output(
        sequence: Sequence,
        new_tokens: list[int],
        text: str,
        reason: FinishReason | None = None,
        entries: Entries | None = None,
        error: str | None = None,
        error_code: ErrorCode | None = None,
    ) -> RequestOutput:
        entries = entries or Entries()
        return RequestOutput(
            request_id=sequence.request_id, index=sequence.index, new_token_ids=new_tokens, text_delta=text,
            finish_reason=reason, logprobs=entries.logprobs, prompt_tokens=sequence.primary_prompt_len,
            completion_tokens=len(sequence.output_ids), error=error, error_code=error_code,
            model_logprobs=entries.analysis,
        )

    # --- logprob entries -------------------------------------------------------------------------------------
    def token_logprob(
        self, sequence: Sequence, token: int, logprob: float, top_ids: list[int], top_values: list[float]
    ) -> TokenLogprob:
        """The entry of ``token`` about to be added to ``sequence`` (before ``advance``): its alternatives
        rendered in the sequence's context; its own text is set by ``advance`` (what it added to the text)."""
        keys = sequence.detokenizer.render(top_ids)
        top = [TopLogprob(i, key, v, self.token_bytes(i)) for i, key, v in zip(top_ids, keys, top_values)]
        text = keys[top_ids.index(token)] if token in top_ids else sequence.detokenizer.render([token])[0]
        return TokenLogprob(token, text, logprob, top, self.token_bytes(token))

    def token_analysis(self, sequence: Sequence, token: int, distributions: list[Distribution]) -> TokenAnalysis:
        """The per-model entry of ``token`` about to be added to ``sequence`` (before ``advance``, which sets its
        text): every distribution's alternatives rendered in the sequence's context, as ``token_logprob``'s."""
        # The models mostly agree on their candidates: each distinct one is rendered once (rendering dominates).
        candidates = list(dict.fromkeys(i for _, _, ids, _ in distributions for i in ids))
        text = dict(zip(candidates, sequence.detokenizer.render(candidates)))
        models = [
            ModelLogprobs(role, logprob, [TopLogprob(i, text[i], v, self.token_bytes(i)) for i, v in zip(ids, values)])
            for role, logprob, ids, values in distributions
        ]
        # Runner 0 (the base: always in a proxy-tuned row) comes first, the combination last.
        base, proxy = models[0], models[-1]
        assert proxy.role == PROXY_ROLE
        return TokenAnalysis(token, "", proxy.logprob - base.logprob, models)

    def prompt_logprobs(self, scores: PromptScores) -> list[TokenLogprob]:
        """One entry per prompt token; the first has no logprob (nothing predicts it). Texts join to the
        prompt's decoding, in context like the completion's."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, [])
        first = scores.prompt[0]
        entries = [TokenLogprob(first, detokenizer.add(first).token_text, None, [], self.token_bytes(first))]
        for token, logprob, values, ids, rank in zip(scores.targets, scores.chosen, scores.top_values, scores.top_ids,
                                                     scores.ranks):
            keys = detokenizer.render(ids)
            top = [TopLogprob(i, key, v, self.token_bytes(i)) for i, key, v in zip(ids, keys, values)]
            entries.append(TokenLogprob(token, detokenizer.add(token).token_text, logprob, top,
                                        self.token_bytes(token), rank))
        detokenizer.finish()
        entries[-1].token += detokenizer.flushed
        return entries

    def token_bytes(self, token_id: int) -> list[int]:
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = list(token_bytes(self.tokenizer, token_id))
            self._token_bytes[token_id] = raw
        return raw


class Entries:
    """A new token's entries (its logprobs, its per-model logprobs), each optional, given the token's text
    together: what it added to the completion, as ``advance`` learns it."""

    def __init__(
        self, logprobs: list[TokenLogprob] | None = None, analysis: list[TokenAnalysis] | None = None
    ) -> None:
        self.logprobs = logprobs
        self.analysis = analysis

    def _all(self) -> list[list[TokenLogprob] | list[TokenAnalysis]]:
        return [entries for entries in (self.logprobs, self.analysis) if entries]

    def name(self, text: str) -> None:
        for entries in self._all():
            entries[0].token = text

    def extend_last(self, text: str) -> None:
        for entries in self._all():
            entries[-1].token += text
