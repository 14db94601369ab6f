"""Engine decode throughput against the floor (a tight KV-cached loop of the same three models), in one run.

    python -m bench.engine_bench [--tokens 64] [--out bench/results]

Rows (greedy, alpha 1, bench family: ~86M base, ~4M expert / anti-expert):
- floor: prefill, then ``base(t) + expert(t) - anti(t)`` and argmax in a bare loop over transformers'
  DynamicCache; no scheduling, no detokenization, no per-request state. Decode time only.
- engine: ``ProxyEngine`` with the same prompts, decode steps only (from the step at which every sequence
  is running), detokenization and stop checks included.
- research-style: the research code's way on a mixed workload (32 requests, max_tokens 16..64): static
  batches of 16, three sequential passes, every batch runs until its longest request is done.
- engine, same mixed workload: continuous batching with 16 slots.
Ratios are what to read: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from bench.family import build_bench_family
from proxy_engine.config import EngineConfig, ExpertPairConfig, LimitsConfig, ModelConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import PromptInput, SamplingParams

PROMPT_LEN = 32


def prompts(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, len(tokenizer)) for _ in range(PROMPT_LEN)] for _ in range(count)]


@torch.inference_mode()
def floor_loop(models, batch: list[list[int]], tokens: int) -> float:
    """Decode tokens/s of the bare loop (all prompts the same length: no padding, no masks)."""
    ids = torch.tensor(batch)
    caches = [DynamicCache() for _ in models]
    logits = [m(input_ids=ids, past_key_values=c, use_cache=True).logits[:, -1].float() for m, c in zip(models, caches)]
    token = (logits[0] + logits[1] - logits[2]).argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = [m(input_ids=token, past_key_values=c, use_cache=True).logits[:, -1].float() for m, c in zip(models, caches)]
        token = (logits[0] + logits[1] - logits[2]).argmax(-1, keepdim=True)
    return len(batch) * tokens / (time.perf_counter() - start)


@torch.inference_mode()
def research_static(models, pad_id: int, requests: list[tuple[list[int], int]], batch_size: int) -> float:
    """Tokens/s of the research code's way: static left-padded batches, sequential passes, no joining."""
    useful = 0
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        chunk = requests[first : first + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in chunk])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p, _ in chunk])[:, None]).long()
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [DynamicCache() for _ in models]
        steps = max(n for _, n in chunk)
        for step in range(steps):
            outs = [m(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=c, use_cache=True)
                    .logits[:, -1].float() for m, c in zip(models, caches)]
            token = (outs[0] + outs[1] - outs[2]).argmax(-1, keepdim=True)
            ids = token
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position = position[:, -1:] + 1
        useful += sum(n for _, n in chunk)
    return useful / (time.perf_counter() - start)


def engine_decode(engine: ProxyEngine, batch: list[list[int]], tokens: int) -> float:
    """Decode tokens/s of the engine once every sequence runs (prefill excluded, like the floor)."""
    params = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add(engine.make_sequences(f"r{i}", PromptInput(token_ids=prompt), params))
    while len(engine.running) < len(batch):
        engine.step()
    generated = 0
    start = time.perf_counter()
    while engine.has_work():
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return generated / (time.perf_counter() - start)


def engine_workload(engine: ProxyEngine, requests: list[tuple[list[int], int]]) -> float:
    start = time.perf_counter()
    generated = 0
    for i, (prompt, n) in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.add(engine.make_sequences(f"w{i}", PromptInput(token_ids=prompt), params))
    while engine.has_work():
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for every row")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    family = build_bench_family()
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    paths = [family.base, family.expert, family.anti_expert]
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]
    config = EngineConfig(
        base=ModelConfig(path=str(family.base)),
        experts=[ExpertPairConfig(expert=ModelConfig(path=str(family.expert)),
                                  anti_expert=ModelConfig(path=str(family.anti_expert)))],
        limits=LimitsConfig(max_num_seqs=16, max_num_batched_tokens=1024),
    )
    loaded = load_models(config)
    best = lambda f: max(f() for _ in range(args.repeats))  # noqa: E731

    results: dict[str, float] = {}
    for batch_size in (1, 16):
        batch = prompts(tokenizer, batch_size)
        results[f"floor_b{batch_size}"] = best(lambda: floor_loop(models, batch, args.tokens))
        results[f"engine_b{batch_size}"] = best(lambda: engine_decode(ProxyEngine(loaded, config), batch, args.tokens))
    rng = random.Random(1)
    workload = [(p, rng.randint(16, 64)) for p in prompts(tokenizer, 32, seed=2)]
    pad = tokenizer.pad_token_id or 0
    results["research_mixed"] = best(lambda: research_static(models, pad, workload, 16))
    results["engine_mixed"] = best(lambda: engine_workload(ProxyEngine(loaded, config), workload))

    ratios = {
        "engine / floor, 1 sequence": results["engine_b1"] / results["floor_b1"],
        "engine / floor, 16 sequences": results["engine_b16"] / results["floor_b16"],
        "engine 16 / engine 1 (aggregate)": results["engine_b16"] / results["engine_b1"],
        "engine / research-style, mixed workload": results["engine_mixed"] / results["research_mixed"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps({"tokens_per_s": results, "ratios": ratios}, indent=2))
    lines = [
        "| measurement | tokens/s |", "|---|---:|",
        *[f"| {name} | {value:.1f} |" for name, value in results.items()],
        "", "| ratio | value |", "|---|---:|",
        *[f"| {name} | {value:.2f}x |" for name, value in ratios.items()],
    ]
    table = "\n".join(lines)
    (args.out / "engine.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
