"""Two expert pairs over one anti-expert: the model loaded and run once (proxy_engine/layout.py) against two
copies of it, side by side in one run.

    python -m bench.shared_bench [--family bench|real|tiny] [--tokens 64] [--repeats 3] [--threads N]

Both engines serve ``base + a1 (expert - anti) + a2 (expert' - anti)``, greedy, with the same weights: the
second expert is the first loaded as a distinct model (an explicit dtype), and in the "copies" engine the
second anti-expert too. Rows: decode tokens/s at 1 and 16 sequences (prefill excluded), interleaved, medians
of paired ratios; the parameter bytes each engine holds; and whether the two answered the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench.engine_bench import engine_decode, prompts
from bench.family import family_paths, pin_threads
from proxy_engine.config import EngineConfig, ExpertPairConfig, LimitsConfig, ModelConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import PromptInput, SamplingParams

ALPHAS = [1.0, 0.5]


def config(family, *, shared: bool) -> EngineConfig:
    anti = ModelConfig(path=str(family.anti_expert))
    second_anti = anti if shared else ModelConfig(path=str(family.anti_expert), dtype="float32")
    return EngineConfig(
        base=ModelConfig(path=str(family.base)),
        experts=[ExpertPairConfig(expert=ModelConfig(path=str(family.expert)), anti_expert=anti),
                 ExpertPairConfig(expert=ModelConfig(path=str(family.expert), dtype="float32"),
                                  anti_expert=second_anti, alpha=ALPHAS[1])],
        limits=LimitsConfig(max_num_seqs=16, max_num_batched_tokens=1024),
    )


def held_bytes(loaded) -> int:
    return sum(p.numel() * p.element_size() for m in loaded for p in m.model.parameters())


def greedy_tokens(engine: ProxyEngine, batch: list[list[int]], tokens: int) -> list[list[int]]:
    for i, prompt in enumerate(batch):
        engine.add(engine.make_sequences(f"t{i}", PromptInput(token_ids=prompt),
                                         SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for output in engine.step():
            out.setdefault(output.request_id, []).extend(output.new_token_ids)
    return [out[f"t{i}"] for i in range(len(batch))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["bench", "real", "tiny"], default="bench")
    parser.add_argument("--family-dir", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/shared_anti_expert"))
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads)
    family = family_paths(args.family, args.family_dir)
    configs = {name: config(family, shared=name == "shared") for name in ("shared", "copies")}
    loaded = {name: load_models(c) for name, c in configs.items()}
    tokenizer = loaded["shared"][0].tokenizer
    batches = {size: prompts(tokenizer, size) for size in (1, 16)}
    same = (greedy_tokens(ProxyEngine(loaded["shared"], configs["shared"]), batches[16], 16)
            == greedy_tokens(ProxyEngine(loaded["copies"], configs["copies"]), batches[16], 16))
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for size in (1, 16):
            for name in ("shared", "copies"):  # side by side in time
                rate = engine_decode(ProxyEngine(loaded[name], configs[name]), batches[size], args.tokens)
                samples.setdefault(f"{name}_b{size}", []).append(float(rate))
    rates = {key: statistics.median(values) for key, values in samples.items()}
    ratios = {f"shared / copies, {size} sequence{'s' if size > 1 else ''}": statistics.median(
        a / b for a, b in zip(samples[f"shared_b{size}"], samples[f"copies_b{size}"])) for size in (1, 16)}
    memory = {name: held_bytes(models) for name, models in loaded.items()}
    meta = {"family": args.family, "threads": threads, "tokens": args.tokens, "repeats": args.repeats,
            "load": os.getloadavg()[0], "models": {name: len(models) for name, models in loaded.items()},
            "same_tokens": same}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared.json").write_text(json.dumps(
        {"meta": meta, "tokens_per_s": rates, "ratios": ratios, "parameter_bytes": memory, "samples": samples},
        indent=2))
    lines = [
        f"family {args.family}; threads {threads}; {args.tokens} decode steps; median of {args.repeats} interleaved "
        f"repeats; load average {meta['load']:.2f}; same greedy tokens: {same}",
        "", "| engine | models loaded | parameter MB | tokens/s, 1 seq | tokens/s, 16 seqs |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {len(loaded[name])} | {memory[name] / 1e6:.1f} | {rates[f'{name}_b1']:.1f} | "
          f"{rates[f'{name}_b16']:.1f} |" for name in ("shared", "copies")],
        "", "| ratio (median of paired repeats) | value |", "|---|---:|",
        *[f"| {name} | {value:.2f}x |" for name, value in ratios.items()],
    ]
    (args.out / "shared.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
