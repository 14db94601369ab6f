"""Beam search over the combined (proxy-tuned) distribution: vLLM's ``use_beam_search``, ``n`` beams wide.

vLLM serves beam search above its engine, and so does this: each step asks the engine for one token of every
live beam (one request, a prompt per beam: the prompt with the beam's tokens as a ``PromptInput.continuation``,
greedy, with the top ``2n`` logprobs), keeps the ``n`` likeliest extensions, and sets aside those ended by an
end-of-sequence or stop token.
Each step's prompts are the last step's plus one token, so the prefix cache holds all but the last block of each.
The search ends when no beam is live, at ``max_tokens``, at the context's end, or when no live beam can still
rank among the ``n`` best ended ones (an exact bound: the answer is what running on would give).

The ``n`` best beams, by ``logprob / length ** length_penalty`` (vLLM's ranking: the length counts the prompt
and the output, less a final end token), are then read out by one ordinary request that replays them
(``SamplingParams.replay``): its text, logprobs, stop strings, usage and streaming are those of any generation,
so every endpoint answers a beam search as it answers sampling. A beam whose text comes to hold a stop string ends
there during the search, and its answer is cut there as any other is (vLLM's beam search ignores stop strings).

The engine (a ``ProxyEngine`` in this process or in its own) is reached through ``add_request`` and ``abort``
only: the search needs no engine of its own and runs beside every other request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy_engine.async_engine import RequestStream
from proxy_engine.request import (
    ContextLengthError,
    EngineOverloadedError,
    ErrorCode,
    FieldError,
    FinishReason,
    PromptInput,
    RequestOutput,
    SamplingParams,
    Target,
)

CANDIDATES_PER_BEAM = 2  # x n: enough that n beams survive however many candidates end (vLLM's 2n)
_BUSY_RETRIES = 200  # a later step turned away by a full queue waits for room (about 10 s at most), then fails
_BUSY_WAIT_S = 0.05


@dataclass(frozen=True)
class Beam:
    tokens: tuple[int, ...] = ()  # generated so far (an ended beam's last is its end or stop token)
    logprob: float = 0.0  # their summed logprob under the combined distribution
    ended: bool = False  # by an end-of-sequence or stop token id, or a stop string its text came to hold
    text: str = ""  # what its tokens write after the prompt (as their logprob entries render them)


def beam_score(beam: Beam, prompt_len: int, length_penalty: float) -> float:
    """vLLM's ranking (transformers' before it): the logprob over the length ** ``length_penalty``, the length being
    the prompt's and the output's tokens, less an ended beam's final token."""
    length = max(1, prompt_len + len(beam.tokens) - (1 if beam.ended else 0))
    return beam.logprob / length**length_penalty


def completes_stop(text: str, added: str, stops: Sequence[str]) -> bool:
    """Whether ``added`` after ``text`` completes one of ``stops`` (one that ``text`` alone held would have ended
    the beam already)."""
    return any(stop in text[max(0, len(text) - len(stop) + 1):] + added for stop in stops)


def extend(live: Sequence[Beam], candidates: Sequence[Iterable[tuple[int, float, str]]], width: int,
           ending: frozenset[int], stops: Sequence[str] = ()) -> tuple[list[Beam], list[Beam]]:
    """One step: each live beam's candidates (token id, logprob, the text it adds) as new beams; those whose token
    is in ``ending``, or whose text completes one of ``stops``, have ended; the ``width`` likeliest of the others
    live on (ties: the earlier beam's, then the likelier token's, as the candidates come)."""
    grown: list[Beam] = []
    ended: list[Beam] = []
    for beam, options in zip(live, candidates):
        for token, logprob, added in options:
            if not math.isfinite(logprob):
                continue  # a token the combination rules out entirely
            stopped = token in ending or completes_stop(beam.text, added, stops)
            new = Beam(beam.tokens + (token,), beam.logprob + logprob, stopped, beam.text + added)
            (ended if new.ended else grown).append(new)
    grown.sort(key=lambda b: b.logprob, reverse=True)  # stable: ties keep their order
    return grown[:width], ended


def best(beams: Iterable[Beam], width: int, prompt_len: int, length_penalty: float) -> list[Beam]:
    """The ``width`` best-ranked beams, best first."""
    return sorted(beams, key=lambda b: beam_score(b, prompt_len, length_penalty), reverse=True)[:width]


def settled(live: Sequence[Beam], ended: Sequence[Beam], width: int, prompt_len: int, length_penalty: float,
            max_output: int) -> bool:
    """Whether no live beam can still rank among the ``width`` best ended ones, however it goes on (up to
    ``max_output`` tokens): its logprob only falls, so its best is now (length_penalty < 0) or at the longest
    (length_penalty >= 0, a negative logprob over a longer length is nearer 0)."""
    if len(ended) < width:
        return False
    worst = beam_score(best(ended, width, prompt_len, length_penalty)[-1], prompt_len, length_penalty)
    for beam in live:
        if length_penalty >= 0:
            length = prompt_len + max_output
        else:
            length = prompt_len + len(beam.tokens) + 1
        if beam.logprob / max(1, length) ** length_penalty > worst:
            return False
    return True


def step_params(params: SamplingParams) -> SamplingParams:
    """What each step asks of the engine for every prompt (one per live beam): its next token, greedy, with the top
    2n alternatives and the request's combination (alpha, priority, model). The search itself tells the ends
    (ignore_eos here)."""
    return dataclasses.replace(
        params, n=1, max_tokens=1, default_max_tokens=None, temperature=0.0, seed=None, ignore_eos=True,
        logprobs=CANDIDATES_PER_BEAM * params.n, prompt_logprobs=None, model_logprobs=None, return_prompt_ids=False,
        beam_search=False, replay=None)


class BeamSearchFailed(Exception):
    """A step's request ended in error (its timeout, an engine fault): the search's answer is that error."""

    def __init__(self, output: RequestOutput) -> None:
        super().__init__(output.error)
        self.output = output


async def _next_tokens(engine, request_id: str, prompts: list[PromptInput], params: SamplingParams, target: Target,
                       patient: bool) -> list[RequestOutput]:
    """Every live beam's next token, as one request of one prompt per beam (admitted together, so the beams of a
    step prefill as one group where the step's token budget allows), run to its end: prompt ``k``'s output. Aborted
    if the search is cancelled meanwhile. A full queue is waited out when ``patient`` (a search under way), and
    refused otherwise (its first step: a 429 at once)."""
    for attempt in range(_BUSY_RETRIES + 1):
        try:
            stream = await engine.add_request(request_id, prompts, params, target)
            break
        except EngineOverloadedError:
            if not patient or attempt == _BUSY_RETRIES:
                raise
            await asyncio.sleep(_BUSY_WAIT_S)
    tokens: dict[int, RequestOutput] = {}
    ended = 0
    try:
        async for output in stream:
            ended += output.finished
            if output.finish_reason is FinishReason.ERROR:
                raise BeamSearchFailed(output)
            if output.logprobs:  # max_tokens 1, with logprobs: each prompt's one token carries them
                tokens[output.index] = output
        return [tokens[k] for k in range(len(prompts))]
    finally:
        if ended < len(prompts):  # the search was cancelled (or failed) meanwhile
            engine.abort(request_id)


async def search(engine, request_id: str, prompt: PromptInput, params: SamplingParams,
                 target: Target) -> list[Beam]:
    """The ``params.n`` best beams for one prompt, best first."""
    width = params.n
    ending = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else
                                                 frozenset(engine.info.eos_token_ids))
    asked = step_params(params)
    limit = params.max_tokens if params.max_tokens is not None else params.default_max_tokens
    max_output = limit if limit is not None else engine.info.max_model_len
    live, ended = [Beam()], []
    prompt_len, steps = 0, 0
    while live and steps < max_output:
        prompts = [dataclasses.replace(prompt, continuation=prompt.continuation + beam.tokens) for beam in live]
        try:
            outputs = await _next_tokens(engine, f"{request_id}-{steps}", prompts, asked, target, patient=steps > 0)
        except ContextLengthError:
            if steps == 0:
                raise
            break  # the context is full: the live beams end here, at its length
        if steps == 0:
            prompt_len = outputs[0].prompt_tokens
        candidates = [[(top.token_id, top.logprob, top.token) for top in out.logprobs[0].top] for out in outputs]
        live, done = extend(live, candidates, width, ending, params.stop)
        ended += done
        steps += 1
        if settled(live, ended, width, prompt_len, params.length_penalty, max_output):
            break
    return best([*ended, *live], width, prompt_len, params.length_penalty)


async def add_beam_search_request(engine, request_id: str, prompt: PromptInput | list[PromptInput],
                                  params: SamplingParams, target: Target = Target.PROXY, **kwargs) -> RequestStream:
    """``engine.add_request`` for a beam search: the search (every prompt's at once), then the request that reads
    out the ``n`` best beams of each prompt as its choices. ``FieldError`` for what beam search cannot honour; a
    step that fails makes the answer that failure, every choice ending in its error."""
    params.check_beam_search()
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if any(one.truncate == -1 for one in prompts):  # "to what fits" would cut each step's prompt differently
        raise FieldError("truncate_prompt_tokens -1 cannot be combined with use_beam_search: give a count of tokens",
                         "truncate_prompt_tokens")
    try:
        async with asyncio.TaskGroup() as group:
            searches = [group.create_task(search(engine, f"{request_id}-beam{i}", one, params, target))
                        for i, one in enumerate(prompts)]
    except ExceptionGroup as group:
        first = group.exceptions[0]
        if isinstance(first, BeamSearchFailed):
            return _failed(request_id, len(prompts) * params.n, first.output)
        if isinstance(first, FieldError) and first.param == "logprobs":
            raise FieldError(f"use_beam_search with n={params.n} reads the {CANDIDATES_PER_BEAM * params.n} likeliest "
                             f"tokens per step, more than this server's max_logprobs allows: send a smaller n",
                             "n") from None
        raise first from None
    found = [s.result() for s in searches]
    replay = tuple(beam.tokens for beams in found for beam in beams)
    if len(replay) != len(prompts) * params.n:  # a vocabulary narrower than the beam: fewer answers than asked
        raise FieldError(f"use_beam_search found fewer than n={params.n} continuations: send a smaller n", "n")
    readout = dataclasses.replace(params, beam_search=False, replay=replay, temperature=0.0, seed=None)
    return await engine.add_request(request_id, prompt, readout, target, **kwargs)


def _failed(request_id: str, choices: int, output: RequestOutput) -> RequestStream:
    """A request stream whose every choice ends in ``output``'s error (as a failed generation's would)."""
    stream = RequestStream(request_id, choices, output.prompt_tokens)
    for index in range(choices):
        stream.queue.put_nowait(RequestOutput.failure(request_id, index, output.error or "beam search failed",
                                                      output.error_code or ErrorCode.INTERNAL_ERROR,
                                                      prompt_tokens=output.prompt_tokens))
    return stream
