"""The benchmark family named in the issues: a ~86M base and a ~4M expert / anti-expert pair, random weights.

A 4,096-token byte-level BPE is trained on generated words; embeddings are tied, so the base has ~88M
parameters (85M in its 12 blocks) and each small model ~3.7M, the sizes the issues name.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from proxy_engine.config import CPU_THREADS_ENV, EngineConfig, ExpertPairConfig, LimitsConfig, ModelConfig
from proxy_engine.families import BENCH_BASE, BENCH_SMALL, Family, build_model, build_tokenizer

BENCH_VOCAB = 4096
DEFAULT_DIR = Path.home() / ".cache" / "proxy-serve" / "bench-family"


def _corpus(words: int = 120_000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 11))) for _ in range(40_000)]
    return [" ".join(rng.choice(vocab) for _ in range(200)) for _ in range(words // 200)]


def build_bench_family(root: Path = DEFAULT_DIR, max_positions: int = 2048) -> Family:
    root = Path(root)
    family = Family(root / "base", root / "expert", root / "anti_expert")
    stamp = root / "family.json"
    options = {"tied": True, "vocab": BENCH_VOCAB, "base": BENCH_BASE.__dict__, "small": BENCH_SMALL.__dict__,
               "pos": max_positions}
    if stamp.exists() and json.loads(stamp.read_text()) == options:
        return family
    tokenizer = build_tokenizer(BENCH_VOCAB, corpus=_corpus())
    build_model(family.base, tokenizer, BENCH_BASE, seed=1, max_position_embeddings=max_positions, tie_embeddings=True)
    for path, seed in ((family.expert, 2), (family.anti_expert, 3)):
        build_model(path, tokenizer, BENCH_SMALL, seed=seed, max_position_embeddings=max_positions, tie_embeddings=True)
    stamp.write_text(json.dumps(options))
    return family


if __name__ == "__main__":
    print(build_bench_family())


REAL_BASE = Path(__file__).resolve().parent.parent / ".cache" / "smollm2-135m-instruct"  # `make real-base`
REAL_PAIR = Path(__file__).resolve().parent.parent / "demo" / "real"  # the real-base demo's expert / anti-expert


def family_paths(kind: str, root: Path | None = None) -> Family:
    """The benchmarks' family: ``bench`` (the shapes the issues name), ``tiny`` (seconds to build: tests) or
    ``real`` (SmolLM2-135M-Instruct in float32 from `make real-base`, ``root`` overriding its directory, with the
    real-base demo's pair)."""
    if kind == "real":
        base = Path(root or REAL_BASE)
        if not (base / "config.json").exists():
            raise FileNotFoundError(f"no model at {base}: run `make real-base` first")
        return Family(base, REAL_PAIR / "expert", REAL_PAIR / "anti_expert")
    if kind == "tiny":
        from proxy_engine.families import build_family

        return build_family(root or Path.home() / ".cache" / "proxy-serve" / "tiny-bench")
    return build_bench_family(root or DEFAULT_DIR)


def engine_config(family: Family, limits: LimitsConfig | None = None) -> EngineConfig:
    """The engine's config for the family: its base and one expert pair, under ``limits`` (default ones)."""
    return EngineConfig(
        base=ModelConfig(path=str(family.base)),
        experts=[ExpertPairConfig(expert=ModelConfig(path=str(family.expert)),
                                  anti_expert=ModelConfig(path=str(family.anti_expert)))],
        limits=limits or LimitsConfig(),
    )


def pin_threads(requested: int | None) -> int:
    """The intra-op team of an in-process bench: ``requested``, else the engine's policy, else torch's default; set
    for torch and, through the environment, for the engine's runners (so the floor and the engine use one size)."""
    import torch

    from proxy_engine.cpu_tuning import cpu_threads

    threads = requested or cpu_threads() or torch.get_num_threads()
    torch.set_num_threads(threads)
    os.environ[CPU_THREADS_ENV] = str(threads)
    return threads
