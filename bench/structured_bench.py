"""Constrained decoding's cost per step: the engine's decode steps under a JSON schema, as a ratio to free ones.

    python -m bench.structured_bench [--family bench|tiny] [--tokens 64] [--repeats 3] [--batch 1 8]

The same prompts are decoded (greedy, ``ignore_eos``, every sequence running, prefill excluded) free and under a
JSON schema that cannot end before ``--tokens`` (an array of at least 64 small objects), so every step of the
constrained run computes a mask: llguidance's per-row mask over the tokenizer, unpacked to the shared vocabulary
and applied to the combined logits. Rows are interleaved and repeated; the ratio (constrained step time / free
step time, per repeat, then the median) is what to read. Also in CPU time of this process, which other
processes on a shared machine disturb less than wall time, and the grammar work alone (one row's mask and
advance, replayed from a constrained run's tokens) as a share of a free step: on a busy machine the ratio's
noise can exceed the cost it measures, the share cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.engine_bench import Clock, prompts, start_decoding
from bench.family import engine_config, family_paths
from proxy_engine.config import CPU_THREADS_ENV, LimitsConfig
from proxy_engine.cpu_tuning import cpu_threads
from proxy_engine.engine import ProxyEngine
from proxy_engine.grammar import StructuredOutput, apply_grammar_masks
from proxy_engine.loader import load_models
from proxy_engine.request import SamplingParams

# Unbounded in practice: at least 64 items of ~15 tokens each, so a run of a few hundred steps never completes it.
SCHEMA = {
    "type": "array", "minItems": 64,
    "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "n", "ok"], "additionalProperties": False},
}


def decode(engine: ProxyEngine, batch: list[list[int]], tokens: int, constrained: bool) -> tuple[float, float]:
    """Seconds (wall, CPU) per decode step once every sequence runs; the first sequence's tokens in ``last_ids``."""
    structured = StructuredOutput("json_schema", SCHEMA) if constrained else None
    start_decoding(engine, batch, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True,
                                                 structured=structured))
    steps = 0
    clock = Clock()
    while engine.has_work():
        for output in engine.step():
            if output.request_id == "r0":
                last_ids.extend(output.new_token_ids)
        steps += 1
    rate = clock.rate(steps)  # steps per second
    return 1.0 / float(rate), 1.0 / rate.per_cpu_s


last_ids: list[int] = []


def mask_cost(engine: ProxyEngine, token_ids: list[int]) -> float:
    """Seconds per step of one row's grammar work alone: its mask (computed, unpacked, applied to a logits row)
    and its advance, replaying a constrained run's tokens through a fresh matcher."""
    matcher = engine.grammars.matcher(StructuredOutput("json_schema", SCHEMA))
    logits = torch.randn(1, engine.vocab_size)
    times = []
    for token in token_ids:
        start = time.perf_counter()
        apply_grammar_masks(logits.clone(), [matcher], [sorted(engine.eos_ids)], matcher.words)
        matcher.accept(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="sequences decoded together")
    parser.add_argument("--family", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--family-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    threads = cpu_threads() or torch.get_num_threads()
    os.environ[CPU_THREADS_ENV] = str(threads)
    family = family_paths(args.family, args.family_dir)
    config = engine_config(family, LimitsConfig(max_num_seqs=max(args.batch), max_num_batched_tokens=1024))
    loaded = load_models(config)
    engine = ProxyEngine(loaded, config)
    engine.grammars.matcher(StructuredOutput("json_schema", SCHEMA))  # the tokenizer conversion, once, outside
    samples: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for size in args.batch:
            batch = prompts(engine.tokenizer, size)
            for constrained in (False, True):
                last_ids.clear()
                samples.setdefault((size, constrained), []).append(decode(engine, batch, args.tokens, constrained))
    mask_s = mask_cost(engine, list(last_ids))
    rows = []
    for size in args.batch:
        free, constrained = samples[(size, False)], samples[(size, True)]
        rows.append({
            "batch": size,
            "free_ms": 1e3 * statistics.median(s[0] for s in free),
            "constrained_ms": 1e3 * statistics.median(s[0] for s in constrained),
            "ratio": statistics.median(c[0] / f[0] for c, f in zip(constrained, free)),
            "ratio_cpu": statistics.median(c[1] / f[1] for c, f in zip(constrained, free)),
            "mask_share": size * mask_s / statistics.median(s[0] for s in free),
        })
    meta = {"family": args.family, "vocab": engine.vocab_size, "mask_us_per_row": mask_s * 1e6,
            "threads": threads, "tokens": args.tokens,
            "repeats": args.repeats, "load": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"family {args.family} (vocab {engine.vocab_size}); threads {threads}; {args.tokens} decode steps; "
          f"median of {args.repeats} interleaved repeats; load average {meta['load']:.2f}\n")
    print("| sequences | free step (ms) | JSON-schema step (ms) | ratio | ratio per CPU-second | "
          "grammar work / free step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['batch']} | {row['free_ms']:.2f} | {row['constrained_ms']:.2f} | {row['ratio']:.3f} | "
              f"{row['ratio_cpu']:.3f} | {100 * row['mask_share']:.1f}% |")
    print(f"\nGrammar work per constrained row and step (mask + advance, replayed alone): {mask_s * 1e6:.0f} us")


if __name__ == "__main__":
    main()
