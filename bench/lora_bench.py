"""A LoRA expert over its anti-expert, served unmerged (proxy_engine/lora.py: one copy of the small model, both
models' rows through each projection in one pass) against merged into a copy (``lora_mode: merged``), side by side.

    python -m bench.lora_bench [--family bench|real|tiny] [--rank 16] [--tokens 64] [--repeats 3] [--threads N]

The adapter has random weights (B drawn, not peft's zeros) on every projection of the family's anti-expert, rank
``--rank``, and is written once under the output directory. Both engines serve ``base + (expert - anti)`` with
that expert, greedy. Rows: decode tokens/s at 1 and 16 sequences (prefill excluded), the parameter bytes each
engine holds, and whether the two answered the same tokens (W x + B (A x) against (W + B A) x: float rounding
may flip a near-tie, so False is possible and says nothing about correctness; tests/engine/test_lora_unmerged.py
checks that).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from bench.family import family_paths, pin_threads
from bench.shared_bench import arguments, side_by_side
from proxy_engine.config import EngineConfig, ExpertPairConfig, LimitsConfig, ModelConfig, RuntimeConfig

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora(model_dir: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A LoRA over ``model_dir`` with drawn weights on every projection, saved to ``out`` (kept when present)."""
    if (out / "adapter_config.json").exists():
        return out
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                      peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.02)
    wrapped.save_pretrained(out)
    return out


def config(family, adapter: Path, *, merge: bool) -> EngineConfig:
    return EngineConfig(
        base=ModelConfig(path=str(family.base)),
        experts=[ExpertPairConfig(expert=ModelConfig(path=str(adapter)),
                                  anti_expert=ModelConfig(path=str(family.anti_expert)))],
        limits=LimitsConfig(max_num_seqs=16, max_num_batched_tokens=1024),
        runtime=RuntimeConfig(lora_mode="merged" if merge else "unmerged"),
    )


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "bench/results/lora_unmerged", argv,
                     rank={"type": int, "default": 16, "help": "the adapter's rank"})
    threads = pin_threads(args.threads)
    family = family_paths(args.family, args.family_dir)
    adapter = build_lora(family.anti_expert, args.out / f"adapter-{args.family}-r{args.rank}", args.rank)
    side_by_side({name: config(family, adapter, merge=name == "merged") for name in ("unmerged", "merged")},
                 args, threads, "lora")


if __name__ == "__main__":
    main()
