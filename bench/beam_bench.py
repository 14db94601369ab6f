"""Beam search's cost, side by side in one run: a beam search of ``--width`` beams against sampling as many
choices of the same length, and the search with the prefix cache against without.

    python -m bench.beam_bench                        # bench family, 3 interleaved repeats (a few minutes)
    python -m bench.beam_bench --family tiny --repeats 1 --tokens 4     # seconds (what the tests run)

``AsyncEngine`` in-process, proxy-tuned (alpha 1), ``ignore_eos`` (every answer runs ``--tokens`` long), at the
server's default limits. Two engines hold the same family: prefix caching on (the default) and off. Each repeat
draws a new prompt of about ``--prompt-tokens`` tokens and runs, in a rotating order:

- **sampled**: one request, ``n`` = the width, temperature 1: the width's choices decoded as one batch.
- **beam search**: one ``use_beam_search`` request of that width (proxy_engine/beam_search.py): a one-token
  request per live beam per step, then the read-out of the best beams.
- **beam search, no prefix cache**: the same on the engine without a prefix cache (each step prefills its beams'
  whole prompts again).

Ratios are medians of ratios within a repeat (wall time, and CPU time of this process, which other processes on
a shared machine disturb far less); they are what to read. Beam search is expected to cost several times the
sampled request: vLLM's runs the same way (a request per beam per step above its engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

from bench.family import engine_config, family_paths, pin_threads
from proxy_engine.async_engine import AsyncEngine
from proxy_engine.beam_search import add_beam_search_request
from proxy_engine.request import PromptInput, SamplingParams


async def timed(engine: AsyncEngine, request_id: str, prompt: str, params: SamplingParams) -> tuple[float, float]:
    """Wall and CPU seconds of one request, admission to its last output."""
    wall, cpu = time.perf_counter(), time.process_time()
    add = add_beam_search_request if params.beam_search else AsyncEngine.add_request
    stream = await add(engine, request_id, PromptInput(text=prompt), params)
    tokens = 0
    async for output in stream:
        tokens += len(output.new_token_ids)
    assert tokens == params.n * params.max_tokens, (request_id, tokens)
    return time.perf_counter() - wall, time.process_time() - cpu


def words(rng: random.Random, tokenizer, tokens: int) -> str:
    vocabulary = [w for w in tokenizer.get_vocab() if w.isalpha()]
    text = ""
    while len(tokenizer(text).input_ids) < tokens:
        text += " " + " ".join(rng.choice(vocabulary) for _ in range(16))
    return text


async def run(args) -> dict:
    family = family_paths(args.family, args.family_dir)
    threads = pin_threads(args.threads)
    config = engine_config(family)
    cached = AsyncEngine(config)
    uncached = AsyncEngine(config.model_copy(update={
        "prefix_cache": config.prefix_cache.model_copy(update={"enabled": False})}))
    await cached.start()
    await uncached.start()
    rng = random.Random(0)
    samples: dict[str, list[float]] = {}
    try:
        tokenizer = cached.engine.tokenizer
        beam = SamplingParams(n=args.width, max_tokens=args.tokens, ignore_eos=True, beam_search=True)
        sampled = SamplingParams(n=args.width, max_tokens=args.tokens, ignore_eos=True, temperature=1.0, seed=1)
        runs = [("sampled", cached, sampled), ("beam", cached, beam), ("beam_no_cache", uncached, beam)]
        await timed(cached, "warm-up", "warm up", SamplingParams(max_tokens=2, ignore_eos=True))
        await timed(uncached, "warm-up", "warm up", SamplingParams(max_tokens=2, ignore_eos=True))
        for repeat in range(args.repeats):
            prompt = words(rng, tokenizer, args.prompt_tokens)
            shift = repeat % len(runs)
            for name, engine, params in runs[shift:] + runs[:shift]:
                wall, cpu = await timed(engine, f"{name}-{repeat}", prompt, params)
                samples.setdefault(f"{name}_s", []).append(wall)
                samples.setdefault(f"{name}_cpu_s", []).append(cpu)
    finally:
        await cached.shutdown()
        await uncached.shutdown()

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

    ratios = {
        f"beam search / sampled, {args.width} x {args.tokens} tokens": paired("beam_s", "sampled_s"),
        "the same, CPU time": paired("beam_cpu_s", "sampled_cpu_s"),
        "beam search, prefix cache off / on": paired("beam_no_cache_s", "beam_s"),
    }
    meta = {"family": args.family, "threads": threads, "repeats": args.repeats, "width": args.width,
            "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "load": os.getloadavg()[0]}
    return {"meta": meta, "ratios": ratios,
            "medians_s": {name: statistics.median(values) for name, values in samples.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["bench", "tiny", "real"], default="bench")
    parser.add_argument("--family-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=4, help="beams (and sampled choices)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    payload = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "beam.json").write_text(json.dumps(payload, indent=2) + "\n")
    meta = payload["meta"]
    lines = [f"Beam search ({meta['family']} family, {meta['threads']} threads, {meta['repeats']} repeats, prompt "
             f"~{meta['prompt_tokens']} tokens, load {meta['load']:.1f}): `python -m bench.beam_bench`", "",
             "| ratio (median of paired runs) | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f}x |" for name, value in payload["ratios"].items()]
    table = "\n".join(lines) + "\n"
    (args.out / "beam.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
