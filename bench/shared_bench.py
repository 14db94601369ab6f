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
    """Bytes of parameters the engine holds: a model several roles share counted once, an unmerged LoRA's terms
    added."""
    models = {id(m.model): m.model for m in loaded}.values()
    weights = sum(p.numel() * p.element_size() for model in models for p in model.parameters())
    return weights + sum(m.adapter.nbytes for m in loaded if m.adapter is not None)


def greedy_tokens(engine: ProxyEngine, batch: list[list[int]], tokens: int) -> list[list[int]]:
    for i, prompt in enumerate(batch):
        engine.add(engine.make_sequences(f"t{i}", PromptInput(token_ids=prompt),
                                         SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for output in engine.step():
            out.setdefault(output.request_id, []).extend(output.new_token_ids)
    return [out[f"t{i}"] for i in range(len(batch))]


def side_by_side(configs: dict[str, EngineConfig], args: argparse.Namespace, threads: int, stem: str) -> None:
    """Decode tokens/s of two engines (``configs``' two entries, the first the candidate) at 1 and 16 sequences,
    interleaved ``args.repeats`` times; their parameter bytes; whether they answer the same greedy tokens. Written
    to ``args.out / stem`` (.json, .md) and printed."""
    first, second = configs
    loaded = {name: load_models(c) for name, c in configs.items()}
    tokenizer = loaded[first][0].tokenizer
    batches = {size: prompts(tokenizer, size) for size in (1, 16)}
    same = (greedy_tokens(ProxyEngine(loaded[first], configs[first]), batches[16], 16)
            == greedy_tokens(ProxyEngine(loaded[second], configs[second]), batches[16], 16))
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for size in (1, 16):
            for name in configs:  # side by side in time
                rate = engine_decode(ProxyEngine(loaded[name], configs[name]), batches[size], args.tokens)
                samples.setdefault(f"{name}_b{size}", []).append(float(rate))
    rates = {key: statistics.median(values) for key, values in samples.items()}
    ratios = {f"{first} / {second}, {size} sequence{'s' if size > 1 else ''}": statistics.median(
        a / b for a, b in zip(samples[f"{first}_b{size}"], samples[f"{second}_b{size}"])) for size in (1, 16)}
    memory = {name: held_bytes(models) for name, models in loaded.items()}
    meta = {"family": args.family, "threads": threads, "tokens": args.tokens, "repeats": args.repeats,
            "load": os.getloadavg()[0], "models": {name: len(models) for name, models in loaded.items()},
            "same_tokens": same}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "tokens_per_s": rates, "ratios": ratios, "parameter_bytes": memory, "samples": samples},
        indent=2))
    lines = [
        f"family {args.family}; threads {threads}; {args.tokens} decode steps; median of {args.repeats} interleaved "
        f"repeats; load average {meta['load']:.2f}; same greedy tokens: {same}",
        "", "| engine | roles | parameter MB | tokens/s, 1 seq | tokens/s, 16 seqs |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {len(loaded[name])} | {memory[name] / 1e6:.1f} | {rates[f'{name}_b1']:.1f} | "
          f"{rates[f'{name}_b16']:.1f} |" for name in configs],
        "", "| ratio (median of paired repeats) | value |", "|---|---:|",
        *[f"| {name} | {value:.2f}x |" for name, value in ratios.items()],
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def arguments(description: str, out: str, argv: list[str] | None, **extra: dict) -> argparse.Namespace:
    """The side-by-side benches' options, and ``extra`` ones (``--name``: ``add_argument``'s keywords)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, options in extra.items():
        parser.add_argument(f"--{name}", **options)
    parser.add_argument("--family", choices=["bench", "real", "tiny"], default="bench")
    parser.add_argument("--family-dir", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "bench/results/shared_anti_expert", argv)
    threads = pin_threads(args.threads)
    family = family_paths(args.family, args.family_dir)
    side_by_side({name: config(family, shared=name == "shared") for name in ("shared", "copies")}, args, threads,
                 "shared")


if __name__ == "__main__":
    main()
