"""Engine decode throughput against the floor (a tight KV-cached loop of the same three models), in one run.

    python -m bench.engine_bench [--tokens 64] [--repeats 3] [--threads N] [--out bench/results]
    python -m bench.engine_bench --family tiny --tokens 8 --repeats 1     # seconds: what the tests run

Rows (greedy, alpha 1, bench family: ~86M base, ~4M expert / anti-expert):
- floor: prefill, then ``base(t) + expert(t) - anti(t)`` and argmax in a bare loop over transformers'
  DynamicCache; no scheduling, no detokenization, no per-request state. Decode time only.
- engine: ``ProxyEngine`` with the same prompts, decode steps only (from the step at which every sequence
  is running), detokenization and stop checks included.
- research-style: the research code's way on a mixed workload (32 requests, max_tokens 16..64): static
  batches of 16, three sequential passes, every batch runs until its longest request is done.
- engine, same mixed workload: continuous batching with 16 slots.
Every row is repeated ``--repeats`` times, interleaved, and the median reported; ratios are medians of ratios
within a repeat (side by side in time), also per CPU-second of this process, which contention from other
processes on a shared machine disturbs far less than wall time. Ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from bench.family import engine_config, family_paths, pin_threads
from proxy_engine.config import LimitsConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import PromptInput, SamplingParams
from proxy_engine.runner import cache_kwarg

PROMPT_LEN = 32


class Rate(float):
    """Tokens/s (the float value), with ``per_cpu_s``: tokens per CPU-second of this process in the same window."""

    per_cpu_s: float

    @classmethod
    def of(cls, tokens: int, wall: float, cpu: float) -> Rate:
        rate = cls(tokens / wall)
        rate.per_cpu_s = tokens / max(cpu, 1e-9)
        return rate


class Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rate(self, tokens: int) -> Rate:
        return Rate.of(tokens, time.perf_counter() - self.wall, time.process_time() - self.cpu)


def prompts(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, len(tokenizer)) for _ in range(PROMPT_LEN)] for _ in range(count)]


@torch.inference_mode()
def floor_loop(models, batch: list[list[int]], tokens: int) -> Rate:
    """Decode tokens/s of the bare loop (all prompts the same length: no padding, no masks)."""
    ids = torch.tensor(batch)
    caches = [DynamicCache() for _ in models]
    keys = [cache_kwarg(m) for m in models]
    logits = [m(input_ids=ids, use_cache=True, **{k: c}).logits[:, -1].float() for m, k, c in zip(models, keys, caches)]
    token = (logits[0] + logits[1] - logits[2]).argmax(-1, keepdim=True)
    clock = Clock()
    for _ in range(tokens):
        logits = [m(input_ids=token, use_cache=True, **{k: c}).logits[:, -1].float()
                  for m, k, c in zip(models, keys, caches)]
        token = (logits[0] + logits[1] - logits[2]).argmax(-1, keepdim=True)
    return clock.rate(len(batch) * tokens)


@torch.inference_mode()
def research_static(models, pad_id: int, requests: list[tuple[list[int], int]], batch_size: int) -> Rate:
    """Tokens/s of the research code's way: static left-padded batches, sequential passes, no joining."""
    useful = 0
    keys = [cache_kwarg(m) for m in models]
    clock = Clock()
    for first in range(0, len(requests), batch_size):
        chunk = requests[first : first + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in chunk])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p, _ in chunk])[:, None]).long()
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [DynamicCache() for _ in models]
        steps = max(n for _, n in chunk)
        for _ in range(steps):
            outs = [m(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, **{k: c})
                    .logits[:, -1].float() for m, k, c in zip(models, keys, caches)]
            token = (outs[0] + outs[1] - outs[2]).argmax(-1, keepdim=True)
            ids = token
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position = position[:, -1:] + 1
        useful += sum(n for _, n in chunk)
    return clock.rate(useful)


def start_decoding(engine: ProxyEngine, batch: list[list[int]], params: SamplingParams) -> None:
    """Submit one request ``r<i>`` per prompt and step until all of them decode (their prefill done)."""
    for i, prompt in enumerate(batch):
        engine.add(engine.make_sequences(f"r{i}", PromptInput(token_ids=prompt), params))
    while len(engine.running) < len(batch):
        engine.step()


def engine_decode(engine: ProxyEngine, batch: list[list[int]], tokens: int) -> Rate:
    """Decode tokens/s of the engine once every sequence runs (prefill excluded, like the floor)."""
    start_decoding(engine, batch, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
    generated = 0
    clock = Clock()
    while engine.has_work():
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return clock.rate(generated)


def engine_workload(engine: ProxyEngine, requests: list[tuple[list[int], int]]) -> Rate:
    clock = Clock()
    generated = 0
    for i, (prompt, n) in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.add(engine.make_sequences(f"w{i}", PromptInput(token_ids=prompt), params))
    while engine.has_work():
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return clock.rate(generated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for the floor and the engine alike (default: the engine's policy, "
                             "proxy_engine.cpu_tuning.cpu_threads)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--family", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--family-dir", type=Path, default=None, help="where the family is built or cached")
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads)
    family = family_paths(args.family, args.family_dir)
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    paths = [family.base, family.expert, family.anti_expert]
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]
    config = engine_config(family, LimitsConfig(max_num_seqs=16, max_num_batched_tokens=1024))
    loaded = load_models(config)
    rng = random.Random(1)
    workload = [(p, rng.randint(16, 64)) for p in prompts(tokenizer, 32, seed=2)]
    pad = tokenizer.pad_token_id or 0
    batches = {size: prompts(tokenizer, size) for size in (1, 16)}
    rows = {
        "floor_b1": lambda: floor_loop(models, batches[1], args.tokens),
        "engine_b1": lambda: engine_decode(ProxyEngine(loaded, config), batches[1], args.tokens),
        "floor_b16": lambda: floor_loop(models, batches[16], args.tokens),
        "engine_b16": lambda: engine_decode(ProxyEngine(loaded, config), batches[16], args.tokens),
        "research_mixed": lambda: research_static(models, pad, workload, 16),
        "engine_mixed": lambda: engine_workload(ProxyEngine(loaded, config), workload),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, run in rows.items():
            rate = run()
            samples[name].append((float(rate), rate.per_cpu_s))
    results = {name: statistics.median(v[0] for v in values) for name, values in samples.items()}
    cpu = {name: statistics.median(v[1] for v in values) for name, values in samples.items()}

    def paired(a: str, b: str, index: int = 0) -> float:
        return statistics.median(x[index] / y[index] for x, y in zip(samples[a], samples[b]))

    ratios = {
        "engine / floor, 1 sequence": paired("engine_b1", "floor_b1"),
        "engine / floor, 16 sequences": paired("engine_b16", "floor_b16"),
        "engine 16 / engine 1 (aggregate)": paired("engine_b16", "engine_b1"),
        "engine / research-style, mixed workload": paired("engine_mixed", "research_mixed"),
        "engine / floor, 1 sequence, per CPU-second": paired("engine_b1", "floor_b1", 1),
        "engine / floor, 16 sequences, per CPU-second": paired("engine_b16", "floor_b16", 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"family": args.family, "threads": threads, "tokens": args.tokens, "repeats": args.repeats,
            "load": os.getloadavg()[0]}
    (args.out / "engine.json").write_text(json.dumps(
        {"meta": meta, "tokens_per_s": results, "tokens_per_cpu_s": cpu, "ratios": ratios,
         "samples": samples}, indent=2))
    lines = [
        f"family {args.family}; threads {threads}; {args.tokens} decode steps; "
        f"median of {args.repeats} interleaved repeats; "
        f"load average {meta['load']:.2f}",
        "",
        "| measurement | tokens/s | tokens per CPU-second |", "|---|---:|---:|",
        *[f"| {name} | {value:.1f} | {cpu[name]:.1f} |" for name, value in results.items()],
        "", "| ratio (median of paired repeats) | value |", "|---|---:|",
        *[f"| {name} | {value:.2f}x |" for name, value in ratios.items()],
    ]
    table = "\n".join(lines)
    (args.out / "engine.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
