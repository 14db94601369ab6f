"""The conformance matrix, engine side: every family's greedy output equals the naive reference, token for token
and character for character, for staggered, concurrent, mixed-alpha requests (text, token ids and chat)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.prompts import compile_template
from proxy_engine.request import PromptInput, SamplingParams, Target
from tests.conformance.conftest import engine_config
from tests.conformance.reference import NaiveProxy, completion_text, per_model_prompts

STEPS = 10
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"}]
# (request id, prompt, alpha, steps of the engine before it is submitted): lengths differ, so rows of different
# lengths decode together; "ids" prompts are token ids (with the tokenizer's BOS, if it has one).
REQUESTS = [
    ("capital", "The capital of France is", 1.0, 0),
    ("fox", "The quick brown fox jumps over the lazy dog. The capital of Germany is", 1.0, 0),
    ("alpha0", "Question: what is two plus two? Answer:", 0.0, 2),
    ("chat", CHAT, 1.0, 3),
    ("half", "東京 and Café, naïve, déjà vu", 0.5, 3),
    ("ids", "ids:Numbers 0 1 2 3 and punctuation", 2.0, 5),
]


@pytest.fixture(scope="module")
def loaded(family):
    models = load_models(engine_config(family))
    tokenizers = [AutoTokenizer.from_pretrained(p) for p in family.paths()]
    return family, models, tokenizers


def _prompt_input(prompt, tokenizer) -> PromptInput:
    if isinstance(prompt, list):
        return PromptInput(messages=prompt)
    if prompt.startswith("ids:"):
        return PromptInput(token_ids=tokenizer(prompt[4:])["input_ids"])
    return PromptInput(text=prompt)


def test_greedy_matches_naive_reference_token_and_character(loaded):
    family, models, tokenizers = loaded
    config = engine_config(family)
    engine = ProxyEngine(models, config)
    transcript = compile_template(config.transcript_template)
    sequences, results = {}, {}
    pending = list(REQUESTS)
    for step in range(200):
        while pending and pending[0][3] <= step:
            request_id, prompt, alpha, _ = pending.pop(0)
            params = SamplingParams(max_tokens=STEPS, temperature=0.0, alpha=alpha, ignore_eos=True)
            made = engine.make_sequences(request_id, _prompt_input(prompt, tokenizers[0]), params)
            engine.add(made)
            sequences[request_id] = made[0]
        if not pending and not engine.has_work():
            break
        for output in engine.step():
            entry = results.setdefault(output.request_id, {"tokens": [], "text": ""})
            entry["tokens"] += output.new_token_ids
            entry["text"] += output.text_delta
            assert output.error is None, output.error
    naive = NaiveProxy(family.paths(), models[0].vocab_size)
    for request_id, prompt, alpha, _ in REQUESTS:
        text_prompt = prompt[4:] if isinstance(prompt, str) and prompt.startswith("ids:") else prompt
        expected_prompts = per_model_prompts(family, tokenizers, text_prompt, transcript)
        sequence = sequences[request_id]
        used = [0] if alpha == 0 else [0, 1, 2]
        for index in used:  # each model sees its own prompt: chat template, transcript or plain text
            assert sequence.prompts[index] == expected_prompts[index], (request_id, index)
        weights = [1.0, alpha, -alpha]
        expected, _ = naive.greedy([expected_prompts[i] if i in used else None for i in range(3)], weights, STEPS)
        got = results[request_id]
        assert got["tokens"] == expected, request_id
        assert got["text"] == completion_text(tokenizers[0], expected_prompts[0], expected), request_id


def test_each_model_decodes_on_the_path_the_family_table_names(loaded):
    """The README's "decode path" column is what the engine picks: the fast step for the Llama family (RoPE
    scaling and odd head sizes included), transformers' forward for the rest (query / key norms, windows)."""
    family, models, _ = loaded
    engine = ProxyEngine(models, engine_config(family))
    assert {runner.executor for runner in engine.runners} == {family.spec.decode_path}


def test_token_id_prompt_for_a_chat_expert_keeps_one_bos(loaded):
    """A token-id prompt (BOS first, as the tokenizer makes it) rendered through a chat template: one BOS."""
    family, models, tokenizers = loaded
    if not family.chat_expert or tokenizers[0].bos_token_id is None:
        pytest.skip(f"{family.spec.name}: no chat expert or no BOS")
    engine = ProxyEngine(models, engine_config(family))
    ids = tokenizers[0]("The capital of France is")["input_ids"]
    assert ids[0] == tokenizers[0].bos_token_id
    sequence = engine.make_sequences("r", PromptInput(token_ids=ids), SamplingParams(max_tokens=1))[0]
    expected = per_model_prompts(family, tokenizers, "The capital of France is", None)[1]
    assert sequence.prompts[1] == expected
    bos = tokenizers[1].bos_token_id
    assert sequence.prompts[1].count(bos) == expected.count(bos)


def test_expert_alone_through_its_template(loaded):
    family, models, tokenizers = loaded
    engine = ProxyEngine(models, engine_config(family))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    made = engine.make_sequences("e", PromptInput(messages=CHAT), params, Target.EXPERT)
    engine.add(made)
    tokens, text = [], ""
    while engine.has_work():
        for output in engine.step():
            tokens += output.new_token_ids
            text += output.text_delta
    expert_prompt = per_model_prompts(family, tokenizers, CHAT, compile_template(engine.config.transcript_template))[1]
    naive = NaiveProxy(family.paths(), models[0].vocab_size)
    expected, _ = naive.greedy([None, expert_prompt, None], [0.0, 1.0, 0.0], 6)
    assert tokens == expected
    assert text == completion_text(tokenizers[1], expert_prompt, expected)


def test_end_ids_past_the_shared_vocabulary_are_dropped_with_a_warning(loaded, caplog):
    """Mistral base + OpenHermes-style expert: ``<|im_end|>`` (420) is past the shared 420 tokens. min_tokens
    bans every end id: it indexed past the logits (IndexError, a 500) before the id was dropped."""
    family, models, tokenizers = loaded
    with caplog.at_level("WARNING", logger="proxy_engine.loader"):
        engine = ProxyEngine(models, engine_config(family))
    vocab = models[0].vocab_size
    assert all(i < vocab for i in engine.eos_ids)
    past = [i for i in (tokenizers[1].eos_token_id,) if i >= vocab]
    if not past:
        return
    assert any("past the shared vocabulary" in r.message for r in caplog.records)
    made = engine.make_sequences("m", PromptInput(text="The capital of France is"),
                                 SamplingParams(max_tokens=4, min_tokens=3, temperature=0.0))
    engine.add(made)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    assert outputs[-1].finished and outputs[-1].error is None
