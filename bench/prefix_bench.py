"""Prefix caching, side by side in one run: time to first token with a cached prefix against without, and the
cost of the cache on traffic that shares nothing.

    python -m bench.prefix_bench                       # bench family, 3 interleaved repeats (a few minutes)
    python -m bench.prefix_bench --family tiny --repeats 1 --prefix-tokens 200   # seconds (what the tests run)

``ProxyEngine`` in-process, proxy-tuned (alpha 1), greedy, at the server's default limits. Two engines hold the
same loaded models: prefix caching on (the default) and off. Each repeat, in a rotating order:

- **shared prefix**: a request whose first ``--prefix-tokens`` tokens an earlier request had (that one is
  sent first, untimed), against an unshared request of the same length, on the engine with the cache: TTFT.
- **chat's next turn**: a conversation whose system prompt is about ``--prefix-tokens`` tokens; TTFT of its
  first turn (cold) and of the next (the first turn, the assistant's answer and a new question).
- **a burst sharing a cached prefix**: ``--burst`` requests whose first ``--prefix-tokens`` tokens an earlier
  request had, each with its own ``--suffix-tokens`` tail, sent at once: the mean of their times to first token,
  read against the one request with a shared prefix above (alone, it is the best a request of the burst can do).
  Admission counts whole prompts against ``max_num_batched_tokens``, so at the default limits each request of
  the burst prefills as its own group, one after another (bench/NOTES.md: grouping them was slower on the CPU).
- **a warm prompt arriving with a cold one**: a request of ``--mixed-tokens`` tokens whose first
  ``--mixed-tokens`` - ``--suffix-tokens`` an earlier request had, sent at the same time as an unshared one of the
  same length (both fit one step's budget): their times to first token with the admission that keeps the warm one
  out of the cold one's prefill (the default: ``scheduler.admit``'s cached columns) against the admission that
  ignored hits (then both prefill together from the cold row's first column, the warm one's hit thrown away).
- **unshared traffic**: ``--batch`` requests of random ``--traffic-prompt`` token prompts (nothing shared),
  ``--traffic-tokens`` tokens each, all at once: generated tokens/s (prefill included) with the cache on and
  off, in the order on, off, off, on (or the reverse); also per CPU-second of this process, which other
  processes on a shared machine disturb far less, and the share of the CPU time spent in the cache's own work
  (lookups, copying K/V in and out), which the machine's load does not move.

Every prompt is new in each repeat (random tokens or words), so only the intended prefix can hit. Ratios are
medians of ratios within a repeat; they are what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time
from pathlib import Path

from bench.family import engine_config, family_paths, pin_threads
from proxy_engine.config import PrefixCacheConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import PromptInput, SamplingParams


class Timer:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_request(engine: ProxyEngine, request_id: str, prompt: PromptInput, max_tokens: int) -> tuple[float, str]:
    """Send one request to an idle engine and step it to the end: ``(seconds to its first token, its text)``."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    timer = Timer()
    engine.add(engine.make_sequences(request_id, prompt, params))
    first, text = None, ""
    while engine.has_work():
        for output in engine.step():
            if output.new_token_ids and first is None:
                first = timer.elapsed()[0]
            text += output.text_delta
    assert first is not None
    return first, text


def traffic(engine: ProxyEngine, tag: str, prompts: list[list[int]], tokens: int) -> tuple[float, float, float]:
    """Generated tokens per second and per CPU-second for a batch of requests sent at once, and the CPU time
    the prefix cache's own work took (lookups, copies in and out), in seconds."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    spent = [0.0]
    timer = Timer()
    with cache_timing(engine, spent):
        for i, prompt in enumerate(prompts):
            engine.add(engine.make_sequences(f"{tag}-{i}", PromptInput(token_ids=prompt), params))
        generated = 0
        while engine.has_work():
            generated += sum(len(o.new_token_ids) for o in engine.step())
    wall, cpu = timer.elapsed()
    return generated / wall, generated / max(cpu, 1e-9), spent[0]


@contextlib.contextmanager
def cache_timing(engine: ProxyEngine, spent: list[float]):
    """Add the thread CPU time of the runners' prefix-cache methods to ``spent[0]`` while in the block."""
    originals = []
    for runner in engine.runners:
        for name in ("_start_from_cache", "cache_prompts"):
            original = getattr(runner, name)

            def timed(*args, _original=original, **kwargs):
                started = time.thread_time()
                try:
                    return _original(*args, **kwargs)
                finally:
                    spent[0] += time.thread_time() - started

            setattr(runner, name, timed)
            originals.append((runner, name))
    try:
        yield
    finally:
        for runner, name in originals:
            delattr(runner, name)  # back to the class's method


def random_ids(rng: random.Random, count: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(count)]


def words_of(rng: random.Random, tokenizer, tokens: int) -> str:
    """Random lowercase words, about ``tokens`` tokens long."""
    text = ""
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                         for _ in range(50)) + " "
    ids = tokenizer(text)["input_ids"][:tokens]
    return tokenizer.decode(ids).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--family-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefix-tokens", type=int, default=1500, help="shared prefix / system prompt length")
    parser.add_argument("--suffix-tokens", type=int, default=32, help="tokens after the shared prefix")
    parser.add_argument("--batch", type=int, default=8, help="requests of the unshared traffic")
    parser.add_argument("--burst", type=int, default=8, help="requests of the burst sharing a cached prefix")
    parser.add_argument("--mixed-tokens", type=int, default=256, help="prompt tokens of the warm and cold pair")
    parser.add_argument("--traffic-prompt", type=int, default=256, help="prompt tokens of each traffic request")
    parser.add_argument("--traffic-tokens", type=int, default=32, help="tokens generated per traffic request")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the engine's policy)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads)
    family = family_paths(args.family, args.family_dir)
    config = engine_config(family)
    models = load_models(config)
    cached = ProxyEngine(models, config)
    uncached = ProxyEngine(models, config.model_copy(update={"prefix_cache": PrefixCacheConfig(enabled=False)}))
    tokenizer, vocab = cached.tokenizer, cached.vocab_size
    rng = random.Random(7)
    samples: dict[str, list[float]] = {name: [] for name in (
        "ttft_shared_s", "ttft_unshared_s", "ttft_first_turn_s", "ttft_next_turn_s", "ttft_burst_mean_s",
        "traffic_on_tok_s", "traffic_off_tok_s", "traffic_on_tok_cpu_s", "traffic_off_tok_cpu_s",
        "cache_cpu_share", "ttft_mixed_warm_split_s", "ttft_mixed_cold_split_s", "ttft_mixed_warm_together_s",
        "ttft_mixed_cold_together_s",
    )}
    prompt_lens: dict[str, int] = {}

    def shared_prefix(repeat: int) -> None:
        prefix = random_ids(rng, args.prefix_tokens, vocab)
        warm = prefix + random_ids(rng, args.suffix_tokens, vocab)  # an earlier request with the same prefix
        run_request(cached, f"warm{repeat}", PromptInput(token_ids=warm), 1)
        shared = prefix + random_ids(rng, args.suffix_tokens, vocab)
        unshared = random_ids(rng, len(shared), vocab)
        prompt_lens["shared"] = len(shared)
        for name, prompt in (("ttft_shared_s", shared), ("ttft_unshared_s", unshared))[:: 1 if repeat % 2 else -1]:
            samples[name].append(run_request(cached, f"{name}{repeat}", PromptInput(token_ids=prompt), 1)[0])

    def chat_turns(repeat: int) -> None:
        system = words_of(rng, tokenizer, args.prefix_tokens)
        turn1 = [{"role": "system", "content": system}, {"role": "user", "content": words_of(rng, tokenizer, 24)}]
        first, answer = run_request(cached, f"turn1-{repeat}", PromptInput(messages=turn1), 16)
        turn2 = turn1 + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": words_of(rng, tokenizer, 24)}]
        prompt_lens["first_turn"] = len(cached.render(PromptInput(messages=turn1)))
        prompt_lens["next_turn"] = len(cached.render(PromptInput(messages=turn2)))
        samples["ttft_first_turn_s"].append(first)
        samples["ttft_next_turn_s"].append(run_request(cached, f"turn2-{repeat}", PromptInput(messages=turn2), 1)[0])

    def shared_burst(repeat: int) -> None:
        prefix = random_ids(rng, args.prefix_tokens, vocab)
        run_request(cached, f"burst-warm{repeat}", PromptInput(token_ids=prefix + random_ids(rng, 8, vocab)), 1)
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        timer, firsts = Timer(), {}
        for i in range(args.burst):
            prompt = PromptInput(token_ids=prefix + random_ids(rng, args.suffix_tokens, vocab))
            cached.add(cached.make_sequences(f"burst{repeat}-{i}", prompt, params))
        while cached.has_work():
            for output in cached.step():
                if output.new_token_ids:
                    firsts.setdefault(output.request_id, timer.elapsed()[0])
        samples["ttft_burst_mean_s"].append(statistics.fmean(firsts.values()))

    def mixed_arrival(repeat: int) -> None:
        """The warm and the cold prompt sent at once, under each admission (in a rotating order)."""
        for split in (True, False)[:: 1 if repeat % 2 else -1]:
            prefix = random_ids(rng, args.mixed_tokens - args.suffix_tokens, vocab)
            run_request(cached, f"mixed-warm-up{repeat}{split}", PromptInput(token_ids=prefix + [11]), 1)
            warm = prefix + random_ids(rng, args.suffix_tokens, vocab)
            cold = random_ids(rng, args.mixed_tokens, vocab)
            if not split:  # the admission before hits counted: every prompt as cold
                cached._cached_prefix = lambda sequence: 0
            params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
            timer, firsts = Timer(), {}
            for name, prompt in (("cold", cold), ("warm", warm)):
                cached.add(cached.make_sequences(f"mixed-{name}{repeat}{split}", PromptInput(token_ids=prompt), params))
            while cached.has_work():
                for output in cached.step():
                    if output.new_token_ids:
                        firsts.setdefault(output.request_id.split("-")[1][:4], timer.elapsed()[0])
            vars(cached).pop("_cached_prefix", None)  # back to the engine's method
            way = "split" if split else "together"
            samples[f"ttft_mixed_warm_{way}_s"].append(firsts["warm"])
            samples[f"ttft_mixed_cold_{way}_s"].append(firsts["cold"])
        prompt_lens["mixed"] = args.mixed_tokens

    def unshared_traffic(repeat: int) -> None:
        # on, off, off, on (or the reverse): a drift in the machine's load over the four runs cancels out.
        pair = [(cached, "on"), (uncached, "off")][:: 1 if repeat % 2 else -1]
        for half in (pair, pair[::-1]):
            rates = {}
            for engine, state in half:
                prompts = [random_ids(rng, args.traffic_prompt, vocab) for _ in range(args.batch)]
                started = time.process_time()
                rate, per_cpu, spent = traffic(engine, f"traffic-{state}-{repeat}", prompts, args.traffic_tokens)
                rates[state] = (rate, per_cpu)
                if state == "on":
                    samples["cache_cpu_share"].append(spent / (time.process_time() - started))
            for state in ("on", "off"):
                samples[f"traffic_{state}_tok_s"].append(rates[state][0])
                samples[f"traffic_{state}_tok_cpu_s"].append(rates[state][1])

    scenarios = [shared_prefix, chat_turns, shared_burst, mixed_arrival, unshared_traffic]
    for repeat in range(args.repeats):
        for scenario in scenarios[repeat % len(scenarios) :] + scenarios[: repeat % len(scenarios)]:
            scenario(repeat)

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

    ratios = {
        "TTFT shared prefix / unshared (target <= 0.3x)": paired("ttft_shared_s", "ttft_unshared_s"),
        "TTFT chat next turn / first turn (target <= 0.3x)": paired("ttft_next_turn_s", "ttft_first_turn_s"),
        f"TTFT of a burst of {args.burst} sharing a cached prefix (mean) / one alone":
            paired("ttft_burst_mean_s", "ttft_shared_s"),
        "TTFT of a warm prompt sent with a cold one, kept apart / prefilled together":
            paired("ttft_mixed_warm_split_s", "ttft_mixed_warm_together_s"),
        "TTFT of the cold one, kept apart / prefilled together":
            paired("ttft_mixed_cold_split_s", "ttft_mixed_cold_together_s"),
        "unshared traffic tokens/s, cache on / off (target >= 0.97x)": paired("traffic_on_tok_s", "traffic_off_tok_s"),
        "unshared traffic per CPU-second, cache on / off": paired("traffic_on_tok_cpu_s", "traffic_off_tok_cpu_s"),
    }
    medians = {name: statistics.median(values) for name, values in samples.items()}
    hits = {r.name: (r.prefix_cache.hits_total, r.prefix_cache.queries_total) for r in cached.runners if r.prefix_cache}
    meta = {"family": args.family, "threads": threads, "repeats": args.repeats, "prefix_tokens": args.prefix_tokens,
            "prompt_tokens": prompt_lens, "batch": args.batch, "burst": args.burst,
            "traffic_prompt": args.traffic_prompt, "traffic_tokens": args.traffic_tokens, "load": os.getloadavg()[0],
            "max_num_batched_tokens": config.limits.max_num_batched_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix.json").write_text(json.dumps(
        {"meta": meta, "medians": medians, "ratios": ratios, "samples": samples, "hits_queries": hits}, indent=2))
    lines = [
        f"family {args.family}; threads {threads}; proxy-tuned, greedy; prompts (base tokens): {prompt_lens}; "
        f"median of {args.repeats} interleaved repeats; load average {meta['load']:.2f}",
        "",
        "| measurement | median |", "|---|---:|",
        *[f"| {name} | {value:.3f} |" for name, value in medians.items()],
        "", "| ratio (median of paired repeats) | value |", "|---|---:|",
        *[f"| {name} | {value:.2f}x |" for name, value in ratios.items()],
        "", f"the prefix cache's own work (lookups, copying K/V in and out) on the unshared traffic: "
        f"{100 * medians['cache_cpu_share']:.2f}% of the CPU time (median)",
        "", "prefix cache hits / queries (tokens): "
        + ", ".join(f"{name} {h:,} / {q:,}" for name, (h, q) in hits.items()),
    ]
    table = "\n".join(lines)
    (args.out / "prefix.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
