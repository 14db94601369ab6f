"""The per-architecture decode bench (bench/architectures.py): every architecture it names takes the fast path,
both executors decode, and the report carries the command and a row per architecture and level."""

from __future__ import annotations

import json

from bench import architectures


def test_every_architecture_takes_the_fast_path_and_is_timed_against_transformers(tmp_path, monkeypatch):
    monkeypatch.setattr(architectures, "compare", _small(architectures.compare))
    architectures.main(["--levels", "1", "3", "--steps", "2", "--rounds", "1", "--prompt-tokens", "100",
                        "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "architectures.json").read_text())
    assert set(saved["results"]) == set(architectures.ARCHITECTURES)
    for by_rows in saved["results"].values():
        assert set(by_rows) == {"1", "3"}
        for row in by_rows.values():
            assert row["executor"] == "fast" and row["fast_ms"] > 0 and row["transformers_ms"] > 0
            assert abs(row["fast / transformers"] - row["fast_ms"] / row["transformers_ms"]) < 0.01
    report = (tmp_path / "architectures.md").read_text()
    assert "python -m bench.architectures --levels 1 3" in report and "--prompt-tokens 100" in report
    assert "| qwen3 | 3 |" in report and report.count("| fast |") == 2 * len(architectures.ARCHITECTURES)


def test_built_models_have_each_familys_extras():
    qwen3 = architectures.build("qwen3", layers=1, hidden=128)
    norm = qwen3.model.layers[0].self_attn.q_norm.weight
    assert norm.shape == (64,) and not bool((norm == 1).all())
    qwen2 = architectures.build("qwen2", layers=1, hidden=128)
    assert qwen2.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    gemma3 = architectures.build("gemma3", layers=2, hidden=128)
    # Local and global layers, with a window the bench's rows outgrow (64-token prompts, then decode steps).
    assert gemma3.config.layer_types == ["sliding_attention", "full_attention"]
    assert architectures.PROMPT_TOKENS < gemma3.config.sliding_window < architectures.PROMPT_TOKENS + 32


def _small(compare):
    def small(architecture, levels, steps=32, rounds=3, layers=12, hidden=768, prompt_tokens=64):
        return compare(architecture, levels, steps, rounds, layers=1, hidden=128, prompt_tokens=prompt_tokens)

    return small
