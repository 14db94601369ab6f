"""Decode step per architecture: the fast path (``fast_decode.py``) against transformers' forward, side by side.

Each architecture the fast path takes gets a random-weight model of the bench base's shape (12 layers, hidden 768,
a 4,096-token vocabulary; grouped-query heads, and each family's own extras: Qwen2's q/k/v biases, Qwen3's
per-head query / key norms, Gemma-2's soft-caps and sandwich norms, Gemma-3's local + global layers with their own
RoPE, OLMo-2's output norms and whole-projection query / key norms, Granite's multipliers). For each row count,
the two executors decode the same rows over the same prompts, interleaved round by round so that the machine's
drift hits both alike; the report is the median ms per step and the ratio fast / transformers (below 1: the fast
path is faster).

    python -m bench.architectures --levels 1 16 --rounds 3 --out bench/results/architectures
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from proxy_engine.config import RuntimeConfig
from proxy_engine.runner import ModelRunner

VOCAB = 4096
PROMPT_TOKENS = 64


def _config(architecture: str, layers: int, hidden: int):
    import transformers

    heads = hidden // 64
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 3), max_position_embeddings=2048,
                  tie_word_embeddings=True)
    if architecture == "llama":
        return transformers.LlamaConfig(**common)
    if architecture == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if architecture == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=64)
    # Gemma-2 / -3: local layers with an 80-token window, which the rows (64-token prompts) outgrow as they decode.
    local = dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=80,
                 layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    if architecture == "gemma2":
        return transformers.Gemma2Config(**common, **local, attn_implementation="eager")
    if architecture == "gemma3":
        return transformers.Gemma3TextConfig(**common, **local)
    if architecture == "olmo2":
        return transformers.Olmo2Config(**common)
    if architecture == "granite":  # Granite 3's multipliers
        return transformers.GraniteConfig(**common, embedding_multiplier=12.0, residual_multiplier=0.22,
                                          attention_multiplier=0.015625, logits_scaling=8.0)
    expert_size = common["intermediate_size"] // 64 * 16  # a quarter of the dense MLP, in whole 16s as released
    if architecture == "mixtral":  # 8 experts, top 2 (Mixtral-8x7B's routing)
        return transformers.MixtralConfig(**{**common, "intermediate_size": expert_size}, num_local_experts=8,
                                          num_experts_per_tok=2)
    if architecture == "qwen3_moe":  # 16 experts, top 4, renormalised (Qwen3-30B-A3B's shape of routing)
        return transformers.Qwen3MoeConfig(**common, head_dim=64, num_experts=16, num_experts_per_tok=4,
                                           moe_intermediate_size=expert_size, norm_topk_prob=True)
    raise ValueError(f"unknown architecture {architecture!r}")


ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "granite", "mixtral", "qwen3_moe")


def build(architecture: str, layers: int = 12, hidden: int = 768) -> torch.nn.Module:
    """A random-weight model of ``architecture``; biases and norm weights drawn too (not zeros and ones)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(architecture, layers, hidden)).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5) if "norm" in name else parameter.normal_(0.0, 0.1)
    return model


def _join(runner: ModelRunner, rows: int, prompt_tokens: int = PROMPT_TOKENS) -> None:
    runner.keep_rows([])
    job = runner.start_prefill(list(range(rows)), [[5 + i] * prompt_tokens for i in range(rows)])
    while not job.complete:
        runner.prefill_step(job, 512)
    runner.add_rows(job)


def _ms_per_step(runner: ModelRunner, rows: int, steps: int, prompt_tokens: int = PROMPT_TOKENS) -> float:
    _join(runner, rows, prompt_tokens)
    tokens = torch.full((rows,), 7)
    for _ in range(2):  # warm
        runner.decode(tokens)
    started = time.perf_counter()
    for _ in range(steps):
        runner.decode(tokens)
    return (time.perf_counter() - started) / steps * 1000


@torch.inference_mode()
def compare(architecture: str, levels: list[int], steps: int = 32, rounds: int = 3, layers: int = 12,
            hidden: int = 768, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, dict[str, float | str]]:
    """``{rows: {"fast_ms", "transformers_ms", "fast / transformers", "executor"}}`` for ``architecture``."""
    model = build(architecture, layers, hidden)
    runners = {name: ModelRunner(model, VOCAB, 0, f"{architecture}-{name}",
                                 runtime=RuntimeConfig(decode_executor=name)) for name in ("fast", "transformers")}
    results: dict[str, dict[str, float | str]] = {}
    for rows in levels:
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                samples[name].append(_ms_per_step(runner, rows, steps, prompt_tokens))
        fast, slow = statistics.median(samples["fast"]), statistics.median(samples["transformers"])
        results[str(rows)] = {"fast_ms": round(fast, 3), "transformers_ms": round(slow, 3),
                              "fast / transformers": round(fast / slow, 3), "executor": runners["fast"].executor}
    return results


def markdown(results: dict[str, dict[str, dict]], command: str) -> str:
    lines = ["# Decode step per architecture: fast path against transformers' forward", "", f"`{command}`", "",
             "| architecture | rows | fast ms | transformers ms | fast / transformers | executor taken |",
             "|---|---:|---:|---:|---:|---|"]
    for architecture, by_rows in results.items():
        for rows, row in by_rows.items():
            lines.append(f"| {architecture} | {rows} | {row['fast_ms']:.2f} | {row['transformers_ms']:.2f} | "
                         f"{row['fast / transformers']:.2f}x | {row['executor']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 16], help="rows per decode step")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                        help="each row's prompt length (a long one: attention's share of the step grows)")
    parser.add_argument("--out", type=Path, default=None, help="write architectures.json and .md here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {a: compare(a, args.levels, args.steps, args.rounds, prompt_tokens=args.prompt_tokens)
               for a in args.architectures}
    command = "python -m bench.architectures " + " ".join(sys.argv[1:] if argv is None else argv)
    report = markdown(results, command.strip())
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "architectures.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
        (args.out / "architectures.md").write_text(report)


if __name__ == "__main__":
    main()
