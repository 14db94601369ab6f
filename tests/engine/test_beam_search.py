"""Beam search (beam_search.py): its ranking and bound as pure functions, the two engine features it stands on
(a prompt's continuation, a replayed choice), and the whole search against a naive exhaustive reference over the
combined distribution of a family whose expert reads chat prompts (each model its own rendering)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
import torch

from proxy_engine.async_engine import AsyncEngine
from proxy_engine.beam_search import (
    Beam,
    add_beam_search_request,
    beam_score,
    best,
    completes_stop,
    extend,
    settled,
)
from proxy_engine.request import FieldError, FinishReason, PromptInput, SamplingParams
from tests.engine.conftest import engine_config, make_engine, run_to_end, submit
from tests.engine.reference import NaiveProxy

PROMPT = "The quick brown fox"


def test_the_ranking_is_vllms_logprob_over_length_to_the_penalty():
    assert beam_score(Beam((5, 6), -3.0), prompt_len=4, length_penalty=1.0) == -3.0 / 6
    assert beam_score(Beam((5, 2), -3.0, ended=True), prompt_len=4, length_penalty=1.0) == -3.0 / 5  # the end token
    assert beam_score(Beam((5, 6), -3.0), prompt_len=4, length_penalty=0.0) == -3.0
    assert beam_score(Beam((5, 6), -3.0), prompt_len=4, length_penalty=2.0) == -3.0 / 36
    ranked = best([Beam((1,), -1.0), Beam((2, 3, 4), -1.2), Beam((5,), -0.5)], 2, prompt_len=1, length_penalty=1.0)
    assert ranked == [Beam((5,), -0.5), Beam((2, 3, 4), -1.2)]  # the long one outranks (1,): likelier per token


def test_a_step_keeps_the_likeliest_and_sets_the_ended_aside():
    live = [Beam((1,), -1.0, text="a"), Beam((2,), -2.0, text="b")]
    candidates = [[(7, -0.1, "x"), (0, -0.2, ""), (8, -3.0, "y")],
                  [(9, -0.05, "z"), (0, -0.3, ""), (4, float("-inf"), "w")]]
    grown, ended = extend(live, candidates, width=2, ending=frozenset({0}))
    assert grown == [Beam((1, 7), -1.1, text="ax"), Beam((2, 9), -2.05, text="bz")]
    assert ended == [Beam((1, 0), -1.2, True, "a"), Beam((2, 0), -2.3, True, "b")]
    # a stop string ends the beam whose text comes to hold it, across the token boundary too
    grown, ended = extend(live, candidates, width=2, ending=frozenset(), stops=["ay", "bz"])
    assert [b.tokens for b in ended] == [(1, 8), (2, 9)] and all(b.ended for b in ended)


def test_a_stop_string_counts_only_where_the_new_text_completes_it():
    assert completes_stop("hello wor", "ld", ["world"]) and completes_stop("", "a\n", ["\n"])
    assert not completes_stop("hello", " there", ["world", "\n"])
    assert not completes_stop("ab", "c", ["b"])  # held before: that beam would have ended already


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 0.5, 1.0, 2.0])
def test_the_bound_never_settles_while_a_live_beam_could_still_rank(length_penalty):
    """Exact: whenever ``settled`` says so, no continuation of a live beam (any length, any further logprob) scores
    above the worst of the best ended ones."""
    ended = [Beam((1, 0), -2.0, True), Beam((3, 0), -4.0, True)]
    for logprob in (-0.5, -1.5, -3.0, -6.0, -12.0):
        live = [Beam((5, 6), logprob)]
        if not settled(live, ended, 2, prompt_len=3, length_penalty=length_penalty, max_output=6):
            continue
        worst = min(beam_score(b, 3, length_penalty) for b in ended)
        for extra, more in itertools.product(range(1, 5), (0.0, -0.5, -3.0)):
            later = Beam((5, 6) + (9,) * extra, logprob + more)
            assert beam_score(later, 3, length_penalty) <= worst
    assert not settled([Beam((5,), -0.1)], ended[:1], 2, 3, 1.0, 6)  # fewer ended than the width: go on


def test_a_continuation_is_as_if_written_and_a_replay_writes_what_it_is_told(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "free", PROMPT, temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    free = run_to_end(engine)[("free", 0)]["tokens"]

    recorded: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda seqs, combined: [recorded.setdefault(s.request_id, []).append(combined[row].clone())
                                                 for row, s in enumerate(seqs)]
    engine.add(engine.make_sequences("cont", PromptInput(text=PROMPT, continuation=tuple(free[:3])),
                                     SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)))
    run_to_end(engine)
    reference = NaiveProxy([str(chat_family.base), str(chat_family.expert), str(chat_family.anti_expert)], 512)
    [sequence] = engine.make_sequences("x", PromptInput(text=PROMPT), SamplingParams(max_tokens=1))
    prompts = [sequence.prompts[i] + free[:3] for i in range(3)]  # each model's own rendering, then the tokens
    torch.testing.assert_close(recorded["cont"][0], reference.logits(prompts, sequence.weights), atol=1e-4, rtol=0)

    told = (free[0], 7, 300, 7)  # not what greedy decoding writes
    engine.add(engine.make_sequences("replay", PromptInput(text=PROMPT), SamplingParams(
        temperature=0, max_tokens=50, ignore_eos=True, logprobs=0, replay=(told,))))
    replayed = run_to_end(engine)[("replay", 0)]
    assert replayed["tokens"] == list(told) and replayed["finish"] is FinishReason.LENGTH
    assert replayed["completion_tokens"] == 4  # the replay's length caps max_tokens


def _reference_beams(reference, prompts, weights, width, steps, length_penalty):
    """Exhaustive-width beam search over the naive combined logits (ignore_eos): vLLM's algorithm, recomputed."""
    beams = [((), 0.0)]
    for _ in range(steps):
        grown = []
        for tokens, logprob in beams:
            scores = torch.log_softmax(reference.logits([p + list(tokens) for p in prompts], weights).double(), -1)
            top = torch.topk(scores, 2 * width)
            grown += [(tokens + (int(t),), logprob + float(v)) for v, t in zip(top.values, top.indices)]
        grown.sort(key=lambda b: b[1], reverse=True)
        beams = grown[:width]
    prompt_len = len(prompts[0])
    return sorted(beams, key=lambda b: b[1] / (prompt_len + len(b[0])) ** length_penalty, reverse=True)


@contextlib.asynccontextmanager
async def _started(family):
    engine = AsyncEngine(engine_config(family, chat_expert=True, max_num_seqs=8))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def _idle(engine) -> bool:
    """Whether every request (every step's) has ended, waiting up to 5 s."""
    for _ in range(100):
        stats = engine.stats()
        if stats.running + stats.waiting + stats.prefilling == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def _answer(engine, request_id, prompt, params):
    stream = await add_beam_search_request(engine, request_id, prompt, params)
    choices: dict[int, dict] = {}
    async for output in stream:
        entry = choices.setdefault(output.index, {"tokens": [], "text": "", "logprobs": []})
        entry["tokens"] += output.new_token_ids
        entry["text"] += output.text_delta
        entry["logprobs"] += [lp.logprob for lp in output.logprobs or []]
        if output.finished:
            entry["finish"], entry["error"] = output.finish_reason, output.error
    return choices


async def test_the_search_finds_the_reference_beams_read_out_as_any_generation(chat_family):
    async with _started(chat_family) as engine:
        params = SamplingParams(n=3, max_tokens=4, ignore_eos=True, logprobs=1, length_penalty=1.0, beam_search=True)
        choices = await _answer(engine, "b", PromptInput(text=PROMPT), params)
        reference = NaiveProxy([str(chat_family.base), str(chat_family.expert), str(chat_family.anti_expert)], 512)
        [sequence] = engine.engine.make_sequences("x", PromptInput(text=PROMPT), SamplingParams(max_tokens=4))
        expected = _reference_beams(reference, [sequence.prompts[i] for i in range(3)], sequence.weights, 3, 4, 1.0)
        assert [tuple(choices[i]["tokens"]) for i in range(3)] == [tokens for tokens, _ in expected]
        for i, (_, logprob) in enumerate(expected):
            # the answer's logprobs are the beam's: its tokens' under the combined distribution
            assert sum(choices[i]["logprobs"]) == pytest.approx(logprob, abs=1e-3)
            assert choices[i]["finish"] is FinishReason.LENGTH
        # n = 1 is greedy decoding, token for token and character for character
        [greedy] = (await _answer(engine, "g", PromptInput(text=PROMPT),
                                  SamplingParams(n=1, max_tokens=4, ignore_eos=True, beam_search=True))).values()
        plain = [o async for o in await engine.add_request(
            "p", PromptInput(text=PROMPT), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))]
        assert greedy["tokens"] == [t for o in plain for t in o.new_token_ids]
        assert greedy["text"] == "".join(o.text_delta for o in plain)
        assert await _idle(engine)  # every step's request has ended: nothing is left running


async def test_an_end_token_ends_a_beam_and_what_reshapes_the_distribution_is_refused(chat_family):
    async with _started(chat_family) as engine:
        # The likeliest first token as a stop token id: the beam that takes it ends there, with finish "stop".
        probe = await engine.add_request("probe", PromptInput(text=PROMPT),
                                         SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        first = [t async for o in probe for t in o.new_token_ids][0]
        choices = await _answer(engine, "s", PromptInput(text=PROMPT), SamplingParams(
            n=2, max_tokens=5, ignore_eos=True, stop_token_ids=[first], length_penalty=0.0, beam_search=True))
        stopped = [c for c in choices.values() if c["finish"] is FinishReason.STOP]
        assert stopped and all(c["tokens"][-1] == first and len(c["tokens"]) == 1 for c in stopped)

        # A stop string in the likeliest beam's text: the beams that write it end there, their text cut before it.
        [free] = (await _answer(engine, "free", PromptInput(text=PROMPT), SamplingParams(
            n=1, max_tokens=6, ignore_eos=True, beam_search=True))).values()
        stop = free["text"][len(free["text"]) // 2:][:3]
        cut = await _answer(engine, "cut", PromptInput(text=PROMPT), SamplingParams(
            n=2, max_tokens=6, ignore_eos=True, stop=[stop], beam_search=True))
        assert any(c["finish"] is FinishReason.STOP for c in cut.values())
        for c in cut.values():
            assert stop not in c["text"] and (c["finish"] is FinishReason.STOP or len(c["tokens"]) == 6)

        for field, value in (("logit_bias", {3: 1.0}), ("allowed_token_ids", [1, 2]), ("bad_words", ["x"]),
                             ("min_tokens", 2), ("repetition_penalty", 1.2), ("presence_penalty", 0.5)):
            with pytest.raises(FieldError) as refused:
                await add_beam_search_request(engine, "r", PromptInput(text=PROMPT), SamplingParams(
                    max_tokens=3, beam_search=True, **{field: value}))
            assert refused.value.param == field
        with pytest.raises(FieldError) as wide:  # 2n alternatives per step, past max_logprobs (20)
            await add_beam_search_request(engine, "w", PromptInput(text=PROMPT),
                                          SamplingParams(n=11, max_tokens=3, beam_search=True))
        assert wide.value.param == "n"
        with pytest.raises(FieldError) as truncating:
            await add_beam_search_request(engine, "t", PromptInput(text=PROMPT, truncate=-1),
                                          SamplingParams(max_tokens=3, beam_search=True))
        assert truncating.value.param == "truncate_prompt_tokens"


async def test_a_failing_step_fails_every_choice_and_a_cancelled_search_leaves_nothing_running(chat_family):
    async with _started(chat_family) as engine:
        def fail(phase, sequences):
            if any(s.request_id.endswith("-2") for s in sequences):  # the third step
                raise RuntimeError("injected")

        engine.engine.fault_hook = fail
        choices = await _answer(engine, "f", PromptInput(text=PROMPT),
                                SamplingParams(n=2, max_tokens=6, ignore_eos=True, beam_search=True))
        assert sorted(choices) == [0, 1] and all(c["finish"] is FinishReason.ERROR for c in choices.values())
        engine.engine.fault_hook = None

        search = asyncio.ensure_future(add_beam_search_request(
            engine, "c", PromptInput(text=PROMPT), SamplingParams(n=4, max_tokens=200, ignore_eos=True,
                                                                  beam_search=True)))
        await asyncio.sleep(0.5)
        search.cancel()
        with pytest.raises(asyncio.CancelledError):
            await search
        assert await _idle(engine)
