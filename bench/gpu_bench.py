"""GPU benchmark: proxy-tuned decoding against the base alone, on random-weight models of real shapes.

    python -m bench.gpu_bench                       # 7B-shaped base, 1.1B-shaped pair, bf16, cuda:0 (bench/gpu.sh)
    python -m bench.gpu_bench --quick               # smaller shapes, fewer steps
    python -m bench.gpu_bench --cpu --quick         # tiny shapes on the CPU: the code path, in tests

The three models share a 32,000-token vocabulary and are built directly on the device with random weights
(nothing is written to disk). ``ProxyEngine`` runs them; per concurrency (1 and 16 by default) and per
target it measures decode only (from the step at which every sequence runs): milliseconds per step and
aggregate tokens/s.

- ``proxy``: base + (expert - anti-expert), alpha 1;
- ``base``: the base alone (``Target.BASE``: the pair does not run);
- ``expert``: the expert alone (``Target.EXPERT``), i.e. half of the pair's own cost.

Goal: proxy step time within 1.1x of (base + 2 x expert), the models run one after another on one GPU; and
throughput that scales with concurrency. With two or more GPUs a second placement puts the pair on
``cuda:1`` (the base's forward and the pair's then overlap: the engine launches every model before it reads
any result).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from proxy_engine.config import EngineConfig, ExpertPairConfig, LimitsConfig, ModelConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import LoadedModel
from proxy_engine.prompts import PromptRenderer
from proxy_engine.request import PromptInput, SamplingParams, Target

VOCAB = 32_000


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


# Llama-2-7B and TinyLlama-1.1B (grouped-query attention) shapes.
BASE_7B = Shape("7B", 4096, 32, 32, 32, 11008)
PAIR_1B = Shape("1.1B", 2048, 22, 32, 4, 5632)
BASE_QUICK = Shape("1.3B", 2048, 24, 16, 16, 5504)
PAIR_QUICK = Shape("160M", 768, 12, 12, 4, 2048)
BASE_CPU = Shape("tiny", 128, 2, 4, 2, 256)
PAIR_CPU = Shape("tinier", 64, 1, 2, 1, 128)


def tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer with exactly ``vocab`` ids ("t0" ... ): the engine needs one, nothing reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    raw = Tokenizer(models.WordLevel(words, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="t2", pad_token="t0", unk_token="t0")


def build(shape: Shape, device: str, dtype: torch.dtype, seed: int, role: str, tok) -> LoadedModel:
    """A random Llama of ``shape`` built in place on ``device`` (no float32 copy, no disk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                         eos_token_id=2, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # whatever the initialiser left, the benchmark needs finite weights
        for parameter in model.parameters():
            if not bool(torch.isfinite(parameter).all()):
                parameter.normal_(0.0, 0.02)
    renderer = PromptRenderer(tok, "plain", "{{ messages }}", None)
    model_config = ModelConfig(path=f"random-{shape.name}", device=device if device != "cpu" else "cpu")
    return LoadedModel(role=role, config=model_config, model=model, tokenizer=tok, renderer=renderer, max_len=4096,
                       logits_width=VOCAB, vocab_size=VOCAB)


def decode_rate(engine: ProxyEngine, prompts: list[list[int]], steps: int, target: Target) -> tuple[float, float]:
    """``(ms per decode step, tokens/s)`` once every sequence runs; prefill excluded."""
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add(engine.make_sequences(f"{target.value}-{i}-{time.monotonic_ns()}", PromptInput(token_ids=prompt),
                                         params, target))
    while len(engine.running) < len(prompts):
        engine.step()
    for _ in range(2):  # warm: allocator, kernels
        engine.step()
    sync(engine)
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        tokens += sum(len(o.new_token_ids) for o in engine.step())  # each step ends in a host sync (tolist)
    elapsed = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    return elapsed / steps * 1000, tokens / elapsed


def sync(engine: ProxyEngine) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (the code path only)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer steps")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=None, help="decode steps measured per row (default 64; quick 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    steps = args.steps or (16 if args.quick else 64)
    if args.cpu:
        base_shape, pair_shape, dtype, devices = BASE_CPU, PAIR_CPU, torch.float32, ["cpu"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --cpu", file=sys.stderr)
            return 2
        base_shape, pair_shape = (BASE_QUICK, PAIR_QUICK) if args.quick else (BASE_7B, PAIR_1B)
        dtype, devices = torch.bfloat16, [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    placements = {"one device": (devices[0], devices[0])}
    if len(devices) > 1:
        placements["pair on a second GPU"] = (devices[0], devices[1])

    tok = tokenizer()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, VOCAB, (args.prompt_tokens,), generator=gen).tolist() for _ in range(max(args.levels))]
    limits = LimitsConfig(max_num_seqs=max(args.levels), max_num_batched_tokens=max(2048, args.prompt_tokens * 4))
    report: dict = {"device": torch.cuda.get_device_name(0) if not args.cpu else "cpu", "dtype": str(dtype),
                    "base": base_shape.__dict__, "pair": pair_shape.__dict__, "steps": steps,
                    "prompt_tokens": args.prompt_tokens, "placements": {}}
    started = time.perf_counter()
    for placement, (base_device, pair_device) in placements.items():
        models = [build(base_shape, base_device, dtype, 1, "base", tok),
                  build(pair_shape, pair_device, dtype, 2, "expert", tok),
                  build(pair_shape, pair_device, dtype, 3, "anti_expert", tok)]
        print(f"[{placement}] built in {time.perf_counter() - started:.0f}s", flush=True)
        config = EngineConfig(base=models[0].config,
                              experts=[ExpertPairConfig(expert=models[1].config, anti_expert=models[2].config)],
                              limits=limits)
        engine = ProxyEngine(models, config)
        rows = {}
        for level in args.levels:
            samples: dict[str, list[tuple[float, float]]] = {"proxy": [], "base": [], "expert": []}
            for _ in range(args.repeats):  # interleaved
                for name, target in (("proxy", Target.PROXY), ("base", Target.BASE), ("expert", Target.EXPERT)):
                    samples[name].append(decode_rate(engine, prompts[:level], steps, target))
            ms = {name: statistics.median(s[0] for s in values) for name, values in samples.items()}
            rate = {name: statistics.median(s[1] for s in values) for name, values in samples.items()}
            rows[level] = {
                "ms_per_step": ms, "tokens_per_s": rate,
                "proxy / (base + 2 x expert), step time": ms["proxy"] / (ms["base"] + 2 * ms["expert"]),
                "proxy / base, step time": ms["proxy"] / ms["base"],
            }
            print(f"[{placement}] {level:3d} streams: proxy {ms['proxy']:.2f} ms, base {ms['base']:.2f} ms, expert "
                  f"{ms['expert']:.2f} ms per step; proxy {rate['proxy']:.0f} tok/s", flush=True)
        for level in args.levels[1:]:
            rows[level]["proxy tokens/s vs 1 stream"] = rows[level]["tokens_per_s"]["proxy"] / rows[args.levels[0]][
                "tokens_per_s"]["proxy"]
        report["placements"][placement] = rows
        del engine, models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_cpu_path" if args.cpu else "gpu"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [f"device {report['device']}, {report['dtype']}; base {base_shape.name}, pair {pair_shape.name} x 2; "
             f"vocab {VOCAB}; prompts {args.prompt_tokens} tokens; {steps} decode steps; median of {args.repeats}", "",
             "| placement | streams | proxy ms/step | base ms/step | expert ms/step | proxy / (base + 2 expert) "
             "| proxy / base | proxy tok/s | scaling vs 1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for placement, rows in report["placements"].items():
        for level, row in rows.items():
            ms = row["ms_per_step"]
            scaling = row.get("proxy tokens/s vs 1 stream")
            lines.append(f"| {placement} | {level} | {ms['proxy']:.2f} | {ms['base']:.2f} | {ms['expert']:.2f} | "
                         f"{row['proxy / (base + 2 x expert), step time']:.2f}x | "
                         f"{row['proxy / base, step time']:.2f}x | "
                         f"{row['tokens_per_s']['proxy']:.0f} | {'-' if scaling is None else f'{scaling:.1f}x'} |")
    table = "\n".join(lines) + "\n"
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
