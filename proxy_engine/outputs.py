"""From chosen tokens to ``RequestOutput`` deltas: detokenizing, stop checks, finishing, logprob entries.

The builder owns everything text-side of a sequence's life: it makes each sequence's incremental detokenizer,
caches every token's text and raw bytes (the same few thousand ids recur in every logprobs answer), and
turns a token into the step's output (``advance``) or a sequence's last one (``finish``).
"""

from __future__ import annotations

from proxy_engine.detokenizer import IncrementalDetokenizer, token_bytes
from proxy_engine.prompt_scores import PromptScores
from proxy_engine.request import ErrorCode, FinishReason, RequestOutput, SamplingParams, TokenLogprob, TopLogprob
from proxy_engine.sequence import Sequence


class OutputBuilder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.generation_tokens_total = 0
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, list[int]] = {}

    def detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self.tokenizer, list(params.stop), params.include_stop_str_in_output, params.skip_special_tokens
        )

    # --- a sequence's outputs --------------------------------------------------------------------------------
    def advance(self, sequence: Sequence, token: int, logprobs: list[TokenLogprob] | None) -> RequestOutput:
        """Append ``token`` and say what the client gets: a text delta, or the end (stop id or string, length)."""
        sequence.output_ids.append(token)
        self.generation_tokens_total += 1
        if token in sequence.stop_ids():
            return self.finish(sequence, FinishReason.STOP, new_token=token, logprobs=logprobs)
        complete = False
        if sequence.grammar is not None:
            if not sequence.grammar.accept(token):
                return self.finish(sequence, FinishReason.ERROR, new_token=token, logprobs=logprobs,
                                   error=f"the output left its grammar: {sequence.grammar.error}",
                                   error_code=ErrorCode.INTERNAL_ERROR)
            # A complete output (a finite schema's closing brace) ends here: nothing else may follow it.
            complete = sequence.grammar.finished
        # Like vLLM, stop strings only count once min_tokens are out (EOS and stop ids are banned until then).
        step = sequence.detokenizer.add(token, check_stops=len(sequence.output_ids) >= sequence.params.min_tokens)
        if step.stopped or complete:
            return self.finish(sequence, FinishReason.STOP, new_token=token, logprobs=logprobs, text=step.delta)
        if len(sequence.output_ids) >= sequence.max_tokens:
            return self.finish(sequence, FinishReason.LENGTH, new_token=token, logprobs=logprobs, text=step.delta)
        return self._output(sequence, [token], step.delta, logprobs=logprobs)

    def finish(
        self,
        sequence: Sequence,
        reason: FinishReason,
        *,
        new_token: int | None = None,
        logprobs: list[TokenLogprob] | None = None,
        text: str = "",
        error: str | None = None,
        error_code: ErrorCode | None = None,
    ) -> RequestOutput:
        """End ``sequence`` (the held-back text is released unless it failed) and build its last output."""
        sequence.finish(reason, error)
        if reason is not FinishReason.ERROR:
            text += sequence.detokenizer.finish()
        new_tokens = [new_token] if new_token is not None else []
        return self._output(sequence, new_tokens, text, reason, logprobs, error, error_code)

    def fail(self, sequence: Sequence, phase: str, error: BaseException) -> RequestOutput:
        message = f"internal error during {phase}: {type(error).__name__}"
        return self.finish(sequence, FinishReason.ERROR, error=message, error_code=ErrorCode.INTERNAL_ERROR)

    @staticmethod
    def _output(
        sequence: Sequence,
        new_tokens: list[int],
        text: str,
        reason: FinishReason | None = None,
        logprobs: list[TokenLogprob] | None = None,
        error: str | None = None,
        error_code: ErrorCode | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=sequence.request_id, index=sequence.index, new_token_ids=new_tokens, text_delta=text,
            finish_reason=reason, logprobs=logprobs, prompt_tokens=sequence.primary_prompt_len,
            completion_tokens=len(sequence.output_ids), error=error, error_code=error_code,
        )

    # --- logprob entries -------------------------------------------------------------------------------------
    def token_logprob(self, token: int, logprob: float, top_ids: list[int], top_values: list[float]) -> TokenLogprob:
        top = [TopLogprob(i, self.token_text(i), v, self.token_bytes(i)) for i, v in zip(top_ids, top_values)]
        return TokenLogprob(token, self.token_text(token), logprob, top, self.token_bytes(token))

    def prompt_logprobs(self, scores: PromptScores) -> list[TokenLogprob]:
        """One entry per prompt token; the first has no logprob (nothing predicts it)."""
        first = scores.prompt[0]
        entries = [TokenLogprob(first, self.token_text(first), None, [], self.token_bytes(first))]
        for token, logprob, values, ids in zip(scores.targets, scores.chosen, scores.top_values, scores.top_ids):
            entries.append(self.token_logprob(token, logprob, ids, values))
        return entries

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
