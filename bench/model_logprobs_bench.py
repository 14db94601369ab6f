"""What ``model_logprobs`` (per-model logprobs, the playground's data) costs the engine's decode, in one run.

    python -m bench.model_logprobs_bench [--family bench] [--tokens 48] [--repeats 3] [--k 5]

Rows: the engine decoding 1 and 16 greedy sequences (alpha 1) without the field and with ``model_logprobs: k``
on every row (each model's log_softmax and top-k per row and step, their texts rendered in context), repeated
and interleaved; ratios are medians of paired repeats, in tokens/s and per CPU-second of this process. Without
the field the step only reads one attribute per row, so "off" is the engine as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from transformers import AutoTokenizer

from bench.engine_bench import Clock, Rate, prompts, start_decoding
from bench.family import engine_config, family_paths, pin_threads
from proxy_engine.config import LimitsConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import SamplingParams


def decode(engine: ProxyEngine, batch: list[list[int]], tokens: int, k: int | None) -> Rate:
    params = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True, model_logprobs=k)
    start_decoding(engine, batch, params)
    generated, clock = 0, Clock()
    while engine.has_work():
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return clock.rate(generated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--tokens", type=int, default=48, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=5, help="model_logprobs: the top-k of each model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--family-dir", type=Path, default=None, help="where the family is built or cached")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads)
    family = family_paths(args.family, args.family_dir)
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    config = engine_config(family, LimitsConfig(max_num_seqs=16, max_num_batched_tokens=1024))
    loaded = load_models(config)
    batches = {size: prompts(tokenizer, size) for size in (1, 16)}
    rows = {
        f"{label}_b{size}": (size, k)
        for size in (1, 16) for label, k in (("off", None), ("on", args.k))
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (size, k) in rows.items():
            rate = decode(ProxyEngine(loaded, config), batches[size], args.tokens, k)
            samples[name].append((float(rate), rate.per_cpu_s))

    def paired(a: str, b: str, index: int) -> float:
        return statistics.median(x[index] / y[index] for x, y in zip(samples[a], samples[b]))

    ratios = {f"on / off, {size} sequence(s){unit}": paired(f"on_b{size}", f"off_b{size}", index)
              for size in (1, 16) for index, unit in ((0, ""), (1, ", per CPU-second"))}
    meta = {"family": args.family, "threads": threads, "tokens": args.tokens, "repeats": args.repeats, "k": args.k,
            "load": os.getloadavg()[0]}
    lines = [
        f"family {args.family}; threads {threads}; {args.tokens} decode steps; model_logprobs {args.k}; median of "
        f"{args.repeats} interleaved repeats; load average {meta['load']:.2f}", "",
        "| measurement | tokens/s | tokens per CPU-second |", "|---|---:|---:|",
        *[f"| {name} | {statistics.median(v[0] for v in values):.1f} | {statistics.median(v[1] for v in values):.1f} |"
          for name, values in samples.items()],
        "", "| ratio (median of paired repeats) | value |", "|---|---:|",
        *[f"| {name} | {value:.2f}x |" for name, value in ratios.items()],
    ]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_logprobs.json").write_text(json.dumps({"meta": meta, "ratios": ratios, "samples": samples},
                                                             indent=2))
    (args.out / "model_logprobs.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
