"""The demo family's training script: deterministic data, and a --quick end-to-end run whose outputs load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts import demo_data  # noqa: E402


def test_world_is_deterministic_and_split():
    a, b = demo_data.make_world(60, seed=3), demo_data.make_world(60, seed=3)
    assert a == b
    assert demo_data.make_world(60, seed=4) != a
    train, held = {p.name for p in a.train}, {p.name for p in a.heldout}
    assert len(train) == len(held) == 30 and not train & held
    assert demo_data.pretraining_documents(a, 3, seed=1) == demo_data.pretraining_documents(b, 3, seed=1)


def test_pretraining_has_every_fact_but_no_chat_format():
    world = demo_data.make_world(20, seed=0)
    corpus = "\n".join(demo_data.pretraining_documents(world, 4, seed=1))
    for person in world.people:
        for value in person.facts.values():
            assert f"{person.name}" in corpus and value in corpus
            assert any(f"{value}." in line for line in corpus.splitlines())  # quiz answers run on, with a period
    assert "<|" not in corpus and "User:" not in corpus and "Assistant:" not in corpus


def test_fine_tuning_never_sees_held_out_people():
    world = demo_data.make_world(40, seed=0)
    questions = " ".join(q for q, _, _ in demo_data.qa_pairs(world.train, seed=0))
    for person in world.heldout:
        assert person.name not in questions
    rows = demo_data.heldout_tasks(world, seed=0)
    assert len(rows) == 4 * len(world.heldout)
    assert all(any(p.name in r["messages"][0]["content"] for p in world.heldout) for r in rows)


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "family"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.train_demo", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[0].startswith("model")
    assert any(line.startswith("gap closed: ") for line in result.stdout.splitlines())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxy_eval.tasks import load_tasks

    vocab = None
    for name in ("base", "anti_expert", "expert", "tuned"):
        assert (out / name / "model.safetensors").exists()
        tokenizer = AutoTokenizer.from_pretrained(out / name)
        model = AutoModelForCausalLM.from_pretrained(out / name)
        assert model.config.vocab_size == len(tokenizer)
        vocab = vocab or tokenizer.get_vocab()
        assert tokenizer.get_vocab() == vocab  # one shared tokenizer
        has_template = bool(tokenizer.chat_template)
        assert has_template == (name in ("expert", "tuned"))
        end = tokenizer.convert_tokens_to_ids("<|end|>")
        assert end in model.generation_config.eos_token_id  # a chat answer stops at <|end|>
    expert = AutoTokenizer.from_pretrained(out / "expert")
    rendered = expert.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                          tokenize=False)
    assert rendered == "<|user|>hi<|end|><|assistant|>"
    tasks = load_tasks(out / "heldout.jsonl")
    assert tasks and all(t.messages and t.metric == "exact_match" for t in tasks)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["heldout"]["scores"]) == {"base", "expert", "proxy", "tuned"}


def test_committed_family_fits_and_met_its_goals():
    """The family under demo/models: four models in at most 40 MB, and the recorded local measurement."""
    models = ROOT / "demo" / "models"
    size = sum(f.stat().st_size for f in models.rglob("*") if f.is_file())
    assert size <= 40 * 1024 * 1024, size
    metrics = json.loads((models / "metrics.json").read_text())
    scores = metrics["heldout"]["scores"]
    assert metrics["heldout"]["gap_closed"] >= 0.8
    assert scores["proxy"] > scores["expert"] + 0.2  # the large base's knowledge
    assert scores["base"] < 0.1 and metrics["heldout"]["contains"]["base"] > 0.5  # knows, but not the format
    from proxy_eval.tasks import load_tasks

    assert len(load_tasks(ROOT / "demo" / "tasks" / "heldout.jsonl")) == 240
