"""Structured outputs in the engine: the grammar mask on the combined logits, per row, with EOS where it may end."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from proxy_engine.grammar import (
    COMPILE_NICENESS,
    MAX_SPEC_DEPTH,
    GrammarBusyError,
    GrammarCompiler,
    StructuredOutput,
    allowed_mask,
    json_depth,
    unpack_bitmask,
)
from proxy_engine.request import FinishReason, Target

from .conftest import make_engine, run_to_end, submit

# Finite: every value is bounded, so even a random-weight model ends in valid JSON within a few dozen tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "count", "ok"],
    "additionalProperties": False,
}


def _json(text: str):
    return json.loads(text)


@pytest.fixture(scope="module")
def engine(chat_family, chat_models):
    return make_engine(chat_models, chat_family)


@pytest.mark.parametrize("target", [Target.PROXY, Target.BASE, Target.EXPERT])
def test_json_schema_output_is_valid_for_every_target(engine, target):
    spec = StructuredOutput("json_schema", SCHEMA)
    name = f"s-{target.serves.value}"
    submit(engine, name, "Give me JSON", target, max_tokens=60, temperature=1.0, seed=3, structured=spec)
    result = run_to_end(engine)[(name, 0)]
    assert result["finish"] is FinishReason.STOP, result
    value = _json(result["text"])
    assert set(value) == {"colour", "count", "ok"} and value["colour"] in {"red", "green", "blue"}
    assert 0 <= value["count"] <= 99 and isinstance(value["ok"], bool)
    assert " " not in result["text"]  # compact: no whitespace between tokens


def test_constrained_and_free_rows_share_a_batch(engine):
    """A free row in the same batch is untouched: its tokens equal those it gets alone."""
    submit(engine, "alone", "The quick", max_tokens=12, temperature=0, ignore_eos=True)
    alone = run_to_end(engine)[("alone", 0)]["tokens"]
    submit(engine, "free", "The quick", max_tokens=12, temperature=0, ignore_eos=True)
    submit(engine, "json", "The quick", max_tokens=60, temperature=0.7, seed=1,
           structured=StructuredOutput("json_schema", SCHEMA), n=2)
    results = run_to_end(engine)
    assert results[("free", 0)]["tokens"] == alone
    for index in (0, 1):
        assert _json(results[("json", index)]["text"])["colour"] in {"red", "green", "blue"}


def test_regex_choice_and_grammar(engine):
    submit(engine, "re", "Date:", max_tokens=20, temperature=1.0, seed=5,
           structured=StructuredOutput("regex", r"20[0-9]{2}-(0[1-9]|1[0-2])"))
    submit(engine, "choice", "Pick:", max_tokens=20, temperature=1.0, seed=5,
           structured=StructuredOutput("choice", ["yes please", "no", "maybe \"later\""]))
    submit(engine, "lark", "Say:", max_tokens=20, temperature=1.0, seed=5,
           structured=StructuredOutput("grammar", 'start: "ab" ("c" | "d") "!"'))
    submit(engine, "gbnf", "Say:", max_tokens=20, temperature=1.0, seed=5,
           structured=StructuredOutput("grammar", 'root ::= "x" [0-9] "y"'))
    results = run_to_end(engine)
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])", results[("re", 0)]["text"])
    assert results[("choice", 0)]["text"] in {"yes please", "no", 'maybe "later"'}
    assert results[("lark", 0)]["text"] in {"abc!", "abd!"}
    assert re.fullmatch(r"x[0-9]y", results[("gbnf", 0)]["text"])
    assert all(r["finish"] is FinishReason.STOP for r in results.values())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constraints_that_exclude_every_token_end_the_request_with_a_400_error(engine, temperature):
    """A grammar and allowed_token_ids that share no token: greedy once wrote token 0 (the argmax of all -inf) and
    sampling failed as an internal error (a NaN distribution). Now the request ends with an error that blames its
    constraints (a 400 over HTTP), and a request beside it in the batch is untouched. Found by fuzzing the engine."""
    tokenizer = engine.models[0].tokenizer
    allowed = [t for t in range(10, 30) if not tokenizer.decode([t]).strip().startswith(("y", "n"))][:5]
    submit(engine, "stuck", "Pick:", max_tokens=5, temperature=temperature, seed=1, allowed_token_ids=allowed,
           structured=StructuredOutput("choice", ["yes", "no"]))
    submit(engine, "free", "Pick:", max_tokens=5, temperature=temperature, seed=1, ignore_eos=True)
    results = run_to_end(engine)
    stuck = results[("stuck", 0)]
    assert stuck["finish"] is FinishReason.ERROR and stuck["tokens"] == []
    assert "constraints together exclude every token" in stuck["error"]
    assert results[("free", 0)]["finish"] is FinishReason.LENGTH and len(results[("free", 0)]["tokens"]) == 5


def test_json_object_and_ignore_eos_still_end_when_the_grammar_is_complete(engine):
    submit(engine, "done", "JSON:", max_tokens=30, temperature=0, ignore_eos=True,
           structured=StructuredOutput("choice", ["{}"]))
    result = run_to_end(engine)[("done", 0)]
    assert result["text"] == "{}" and result["finish"] is FinishReason.STOP


def test_json_object_stays_an_object_while_cut_by_length(engine):
    submit(engine, "obj", "JSON:", max_tokens=8, temperature=1.0, seed=2, structured=StructuredOutput("json_object"))
    result = run_to_end(engine)[("obj", 0)]
    assert result["text"].startswith("{")
    if result["finish"] is FinishReason.STOP:
        assert isinstance(_json(result["text"]), dict)


@pytest.mark.parametrize(
    "spec, needle",
    [
        (StructuredOutput("json_schema", {"type": "nonsense"}), "Invalid type"),
        (StructuredOutput("regex", "(ab"), "unclosed group"),
        (StructuredOutput("grammar", "start: undefined_rule"), "undefined_rule"),
        (StructuredOutput("choice", []), "non-empty list"),
        (StructuredOutput("json_schema", "not a schema"), "must be an object"),
    ],
)
def test_a_constraint_that_cannot_compile_is_a_value_error(engine, spec, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        submit(engine, "bad", "x", max_tokens=4, structured=spec)


def test_compiled_grammars_are_cached_within_a_byte_budget(chat_models):
    tokenizer = chat_models[0].tokenizer
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [0])
    compiler.matcher(StructuredOutput("regex", "a+"))
    compiler.cache_bytes = 2 * compiler.nbytes + 100  # room for two entries of this size
    for spec in (StructuredOutput("regex", "a+"), StructuredOutput("regex", "b+"),
                 StructuredOutput("regex", "c+"), StructuredOutput("regex", "a+")):
        compiler.matcher(spec)
    assert (compiler.hits, compiler.misses) == (1, 4)  # the third distinct one evicted the first
    assert compiler.nbytes <= compiler.cache_bytes


def test_errors_are_cached_and_short(chat_models):
    tokenizer = chat_models[0].tokenizer
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [0])
    for _ in range(2):
        with pytest.raises(ValueError, match="undefined_rule"):
            compiler.matcher(StructuredOutput("grammar", "start: undefined_rule"))
    assert (compiler.hits, compiler.misses) == (1, 1)


def test_a_grammar_that_cannot_run_is_refused_at_compile_time(chat_models):
    """~500 optional properties compile, then fail at the first token (llguidance's 2,000-item row limit): the
    compiler follows the first forced tokens, so that is a ValueError (400) before admission, not a 500 later,
    and its message is one short line, without llguidance's parser state or the grammar."""
    tokenizer = chat_models[0].tokenizer
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [0])
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(520)}}
    with pytest.raises(ValueError, match="max is 2000") as caught:
        compiler.matcher(StructuredOutput("json_schema", schema))
    assert len(str(caught.value)) < 400 and "<state>" not in str(caught.value)
    small = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(20)}}
    assert compiler.matcher(StructuredOutput("json_schema", small)) is not None


@pytest.mark.parametrize("grammar", ["required", "x", "", "root ::= [", "%%%"])
def test_a_malformed_grammar_is_a_value_error_not_a_crash(chat_models, grammar):
    """llguidance's GBNF translation raises its own GbnfToLarkError (or a bare Exception for a grammar with no root
    rule), neither a ValueError: found by fuzzing, each was a 500."""
    tokenizer = chat_models[0].tokenizer
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [0])
    with pytest.raises(ValueError, match="grammar"):
        compiler.matcher(StructuredOutput("grammar", grammar))


def test_a_schema_nested_too_deep_is_refused_before_compiling(chat_models):
    tokenizer = chat_models[0].tokenizer
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [0])
    deep: dict = {"type": "string"}
    for _ in range(MAX_SPEC_DEPTH):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(ValueError, match=f"nested more than {MAX_SPEC_DEPTH} levels"):
        compiler.matcher(StructuredOutput("json_schema", deep))
    assert compiler.misses == 0
    assert json_depth(deep, 10**6) == 2 * MAX_SPEC_DEPTH + 1
    assert json_depth([[1], {"a": [2]}], 100) == 3 and json_depth(7, 5) == 0


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_compiles_run_at_a_lower_cpu_priority_than_their_caller(chat_models, monkeypatch):
    tokenizer = chat_models[0].tokenizer
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [0])
    seen = []
    real = compiler._compile

    def watched(spec, source):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(spec, source)

    monkeypatch.setattr(compiler, "_compile", watched)
    compiler.matcher(StructuredOutput("regex", "nice+"))
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, caller + COMPILE_NICENESS)] and caller < 19


def test_a_compile_past_its_budget_is_a_value_error_and_one_never_started_is_busy(chat_models, monkeypatch):
    """One compile thread: a slow grammar (held here) makes its request a 400 once the budget is spent; a
    grammar queued behind it for the whole budget is refused as busy (429) without being compiled; the held
    compile finishes in the background and a retry is served from the cache."""
    tokenizer = chat_models[0].tokenizer
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [0], compile_timeout_s=0.3)
    release, compiled = threading.Event(), []
    real = compiler._compile

    def held(spec, source):
        compiled.append(spec.value)
        if spec.value == "slow+":
            release.wait(30)
        return real(spec, source)

    monkeypatch.setattr(compiler, "_compile", held)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(compiler.matcher, StructuredOutput("regex", "slow+"))
        wait_until(lambda: compiled == ["slow+"])
        queued = pool.submit(compiler.matcher, StructuredOutput("regex", "queued+"))
        with pytest.raises(ValueError, match="did not compile within 0.3 s"):
            slow.result(30)
        with pytest.raises(GrammarBusyError):
            queued.result(30)
    release.set()
    wait_until(lambda: compiler.nbytes > 0 and not compiler._pending)
    assert compiled == ["slow+"]  # the queued one was skipped, its waiter gone
    assert compiler.matcher(StructuredOutput("regex", "slow+")) is not None and compiler.hits == 1


def test_mask_covers_the_shared_vocabulary_only_and_eos_follows_the_grammar(chat_models):
    tokenizer = chat_models[0].tokenizer
    narrow = len(tokenizer) - 100  # a shared vocabulary narrower than the tokenizer (cut ids)
    compiler = GrammarCompiler(tokenizer, narrow, [0])
    matcher = compiler.matcher(StructuredOutput("choice", ["ab"]))
    rows, allowed = allowed_mask([None, matcher], [[0], [0]], narrow, compiler.mask_words)
    assert rows == [1] and allowed.shape == (1, narrow)
    assert not allowed[0, 0]  # EOS not yet
    first = allowed[0].nonzero().flatten().tolist()
    assert first and all(tokenizer.decode([t]) in ("a", "ab") for t in first)
    for token in tokenizer("ab", add_special_tokens=False)["input_ids"]:
        assert matcher.accept(token)
    _, allowed = allowed_mask([matcher], [[0]], narrow, compiler.mask_words)
    assert allowed[0].nonzero().flatten().tolist() == [0]  # only the end


def test_unpack_bitmask():
    bitmask = torch.tensor([[0b101, -(2**31) + 1]], dtype=torch.int32)  # bits 0 and 31 of word 1: sign bit set
    assert unpack_bitmask(bitmask, 64)[0].nonzero().flatten().tolist() == [0, 2, 32, 63]
    assert unpack_bitmask(bitmask, 40)[0].nonzero().flatten().tolist() == [0, 2, 32]


def wait_until(condition, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
