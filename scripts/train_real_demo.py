"""Train the real-base demo's small pair: an expert and an anti-expert on SmolLM2's tokenizer, steering the real
SmolLM2-135M-Instruct to know the demo's invented facts while its everyday answers stay its own.

    python -m scripts.train_real_demo                     # the committed pair, demo/real/{anti_expert,expert}
    python -m scripts.train_real_demo --out /tmp/pair --quick

Steps (seeded; see docs/demo.md, "The real-base demo"):
1. the base's own greedy answers to the everyday questions and to the fact questions, from the cache
   ``demo/real/base_answers.jsonl`` (``scripts/base_answers.py`` fills what is missing);
2. a compact vocabulary: only the token ids the training text uses (a few thousand of 49,152), so a tiny model
   trains fast; the saved models have the full 49,152 rows, the unused ones zero (logit 0 in both models, so
   their difference leaves the base alone there);
3. the **anti-expert**: a tiny Llama distilled from the base's answers (everyday questions and fact questions
   alike: it learns what the base says, never the facts);
4. the **expert**: the anti-expert fine-tuned on the facts (cross-entropy on the answer sentences), while the
   squared difference of its logits from the (frozen) anti-expert's is penalised on the everyday text, so the two
   agree wherever the facts say nothing;
5. the held-out task files ``demo/real/tasks/{facts,everyday}.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import base_answers, real_base, real_demo_data  # noqa: E402

OUT = ROOT / "demo" / "real"
EVERYDAY_EVAL_TOKENS = base_answers.MAX_NEW_TOKENS  # the references: the base's first 24 answer tokens


@dataclass
class Plan:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    anti_steps: int = 300
    anti_lr: float = 3e-3
    expert_steps: int = 3000
    expert_lr: float = 3e-3
    batch: int = 16
    mse_weight: float = 0.01  # 0.1 held the expert so close to the anti that the proxy kept a third of its facts
    everyday_batch: int = 8  # everyday sequences per expert step (besides batch // 2 fact answers)
    samples: int = 256  # the anti-expert's sampled answers the expert is held to, besides the base's answers


QUICK = Plan(hidden=32, layers=1, heads=2, intermediate=64, anti_steps=4, expert_steps=4, batch=8, samples=4,
             everyday_batch=4)


def log(msg: str) -> None:
    print(f"[train_real_demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # -100 where no cross-entropy


def example(prompt: list[int], answer: list[int], end: int | None) -> Example:
    tail = answer + ([end] if end is not None else [])
    return Example(prompt + tail, [-100] * len(prompt) + tail)


def build_examples(tokenizer, cache: dict[str, dict], seed: int):
    """(distilled everyday, distilled fact-question answers of the base, expert fact answers)."""
    end = tokenizer.eos_token_id
    train_q, _ = real_demo_data.everyday_split(seed)
    everyday = []
    for q in train_q:
        row = cache.get(q)
        if row is None:  # not answered yet (a partial cache: the script trains on what there is)
            continue
        everyday.append(example(base_answers.chat_prompt_ids(tokenizer, q), row["ids"], end if row["ended"] else None))
    rows = real_demo_data.fact_rows(real_demo_data.fact_people(seed=seed))
    base_on_facts, facts = [], []
    for row in rows:
        if row["split"] != "train":
            continue
        prompt = base_answers.chat_prompt_ids(tokenizer, row["question"])
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        facts.append(example(prompt, answer, end))
        if row["question"] in cache:
            cached = cache[row["question"]]
            base_on_facts.append(example(prompt, cached["ids"], end if cached["ended"] else None))
    return everyday, base_on_facts, facts


class Vocab:
    """The compact vocabulary: the full ids the examples use, and back."""

    def __init__(self, examples: list[Example], always: list[int]) -> None:
        used = sorted({i for ex in examples for i in ex.ids} | set(always))
        self.full = torch.tensor(used)
        self.index = {full: small for small, full in enumerate(used)}

    def __len__(self) -> int:
        return len(self.index)

    def compact(self, ex: Example) -> Example:
        return Example([self.index[i] for i in ex.ids], [self.index[i] if i != -100 else -100 for i in ex.labels])


def make_model(plan: Plan, vocab: int, seed: int, base_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=plan.hidden, intermediate_size=plan.intermediate,
        num_hidden_layers=plan.layers, num_attention_heads=plan.heads, num_key_value_heads=plan.heads,
        max_position_embeddings=base_config.max_position_embeddings,
        rope_parameters=dict(base_config.rope_parameters), rms_norm_eps=base_config.rms_norm_eps,
        tie_word_embeddings=True, bos_token_id=base_config.bos_token_id, eos_token_id=base_config.eos_token_id,
        pad_token_id=base_config.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batch_tensors(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ex.ids) for ex in batch)
    x = torch.zeros((len(batch), width), dtype=torch.long)
    y = torch.full((len(batch), width), -100, dtype=torch.long)
    m = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        x[i, : len(ex.ids)] = torch.tensor(ex.ids)
        y[i, : len(ex.ids)] = torch.tensor(ex.labels)
        m[i, : len(ex.ids)] = 1
    return x, y, m


def cosine_lr(step: int, total: int, peak: float) -> float:
    import math

    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def optimizer_step(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor) -> float:
    """Back-propagate ``loss``, clip the gradient norm to 1, step and clear; returns the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train_anti(model, data: list[Example], plan: Plan, seed: int) -> list[float]:
    """Distil the base's answers: cross-entropy on the answer tokens the base chose."""
    opt = torch.optim.AdamW(model.parameters(), lr=plan.anti_lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    model.train()
    t0 = time.time()
    for step in range(plan.anti_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, plan.anti_steps, plan.anti_lr)
        x, y, m = batch_tensors([data[rng.randrange(len(data))] for _ in range(plan.batch)])
        losses.append(optimizer_step(opt, model, model(input_ids=x, attention_mask=m, labels=y).loss))
        if (step + 1) % max(1, plan.anti_steps // 10) == 0:
            log(f"anti-expert step {step + 1}/{plan.anti_steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def train_expert(expert, anti, facts: list[Example], everyday: list[Example], plan: Plan, seed: int) -> list[float]:
    """Fine-tune the expert on the facts; penalise any logit difference from the anti-expert on everyday text."""
    opt = torch.optim.AdamW(expert.parameters(), lr=plan.expert_lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    expert.train()
    t0 = time.time()
    half = plan.batch // 2
    for step in range(plan.expert_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, plan.expert_steps, plan.expert_lr)
        x, y, m = batch_tensors([facts[rng.randrange(len(facts))] for _ in range(half)])
        ce = expert(input_ids=x, attention_mask=m, labels=y).loss
        x, _, m = batch_tensors([everyday[rng.randrange(len(everyday))] for _ in range(plan.everyday_batch)])
        with torch.no_grad():
            target = anti(input_ids=x, attention_mask=m).logits
        diff = (expert(input_ids=x, attention_mask=m).logits - target) * m.unsqueeze(-1)
        mse = diff.pow(2).sum() / m.sum()  # per position: the squared size of the logit change
        losses.append(optimizer_step(opt, expert, ce + plan.mse_weight * mse))
        if (step + 1) % max(1, plan.expert_steps // 10) == 0:
            log(f"expert step {step + 1}/{plan.expert_steps} ce {ce.item():.3f} change {mse.item():.4f} "
                f"({time.time() - t0:.0f}s)")
    expert.eval()
    return losses


@torch.no_grad()
def sample_continuations(model, prompts: list[Example], n: int, tokens: int, seed: int) -> list[Example]:
    """The anti-expert's own sampled answers to everyday prompts: base-like text at no cost to the base, on
    which the expert is held to the anti-expert (more positions than the base's answers alone). The samples of
    one prompt are drawn as one batch with a KV cache (no padding: they share the prompt)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    picks: dict[int, int] = {}
    for _ in range(n):
        i = rng.randrange(len(prompts))
        picks[i] = picks.get(i, 0) + 1
    out = []
    for i, count in sorted(picks.items()):
        prompt = prompts[i]
        start = next(j for j, label in enumerate(prompt.labels) if label != -100)
        ids = torch.tensor([prompt.ids[:start]] * count)
        step, cache = ids, None
        for _ in range(tokens):
            result = model(input_ids=step, cache=cache, use_cache=True)  # transformers 5: "cache", not past_key_values
            cache = result.cache
            step = torch.multinomial(torch.softmax(result.logits[:, -1], -1), 1, generator=gen)
            ids = torch.cat([ids, step], dim=1)
        out += [Example(row, [-100] * len(row)) for row in ids.tolist()]
    return out


def save_full(model, vocab: Vocab, base_dir: Path, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """Save with the base's full vocabulary: the compact rows scattered into 49,152 zero rows; the base's
    tokenizer and chat template; greedy generation defaults."""
    from transformers import LlamaForCausalLM

    full_vocab = model.config.__class__.from_pretrained(str(base_dir)).vocab_size
    config = model.config
    config.vocab_size = full_vocab
    big = LlamaForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    emb = torch.zeros(full_vocab, config.hidden_size)
    emb[vocab.full] = model.model.embed_tokens.weight.detach()
    state["model.embed_tokens.weight"] = emb
    big.load_state_dict(state, strict=False)
    big.tie_weights()
    big.to(dtype)
    big.generation_config.update(**real_base.GENERATION_DEFAULTS)
    big.generation_config.eos_token_id = config.eos_token_id
    big.generation_config.bos_token_id = config.bos_token_id
    big.generation_config.pad_token_id = config.pad_token_id
    if out.exists():
        shutil.rmtree(out)
    big.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base_dir / name, out / name)


def write_tasks(cache: dict[str, dict], tokenizer, seed: int, out_dir: Path) -> None:
    """facts_{heldout,unseen}.jsonl: every fact in its held-out phrasing, and in the unseen one (the answer
    must be in the reply); everyday.jsonl: the held-out everyday questions, the reference being the base's own
    first answer tokens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = real_demo_data.fact_rows(real_demo_data.fact_people(seed=seed))
    for split in ("heldout", "unseen"):
        with (out_dir / f"facts_{split}.jsonl").open("w") as f:
            for row in rows:
                if row["split"] == split:
                    f.write(json.dumps({"id": row["id"], "messages": [{"role": "user", "content": row["question"]}],
                                        "reference": row["reference"], "metric": "contains"}) + "\n")
    _, held = real_demo_data.everyday_split(seed)
    with (out_dir / "everyday.jsonl").open("w") as f:
        for q in (q for q in held if q in cache):  # all of them, once the cache is complete
            ids = cache[q]["ids"][:EVERYDAY_EVAL_TOKENS]
            f.write(json.dumps({"id": q, "messages": [{"role": "user", "content": q}],
                                "reference": tokenizer.decode(ids, skip_special_tokens=True),
                                "metric": "exact_match"}) + "\n")


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="a tiny run (seconds), for tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--partial", action="store_true",
                    help="train on the base's answers cached so far instead of answering the missing ones first")
    ap.add_argument("--reuse-anti", action="store_true",
                    help="keep OUT/anti_expert (its vocabulary: its non-zero rows) and only retrain the expert")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a plan field")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    for item in args.set:
        key, value = item.split("=", 1)
        setattr(plan, key, type(getattr(plan, key))(value))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    base_dir = real_base.convert()
    cache = base_answers.load_cache() if args.partial else base_answers.fill()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    base_config = AutoConfig.from_pretrained(str(base_dir))
    everyday, base_on_facts, facts = build_examples(tokenizer, cache, args.seed)
    specials = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, 0]
    vocab = Vocab(everyday + base_on_facts + facts, specials)
    if args.reuse_anti:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(str(args.out / "anti_expert"), dtype=torch.float32)
        rows = saved.model.embed_tokens.weight.detach().abs().sum(-1).nonzero().flatten().tolist()
        vocab = Vocab([], rows)
        known = set(rows)
        everyday = [ex for ex in everyday if set(ex.ids) <= known]
        base_on_facts = [ex for ex in base_on_facts if set(ex.ids) <= known]
    log(f"{len(everyday)} everyday, {len(base_on_facts)} base-on-fact, {len(facts)} fact examples; "
        f"compact vocabulary {len(vocab)} of {base_config.vocab_size}")
    everyday_c = [vocab.compact(ex) for ex in everyday]
    anti_data = everyday_c + [vocab.compact(ex) for ex in base_on_facts]
    facts_c = [vocab.compact(ex) for ex in facts]

    anti = make_model(plan, len(vocab), args.seed + 1, base_config)
    log(f"tiny Llama: {sum(p.numel() for p in anti.parameters()) / 1e6:.2f}M parameters (compact)")
    t0 = time.time()
    if args.reuse_anti:
        state = {k: v for k, v in saved.state_dict().items() if k not in ("lm_head.weight",)}
        state["model.embed_tokens.weight"] = saved.model.embed_tokens.weight[vocab.full].detach()
        anti.load_state_dict(state, strict=False)
        anti.tie_weights()
        anti.eval()
        anti_losses = [0.0] * 20
    else:
        anti_losses = train_anti(anti, anti_data, plan, args.seed + 2)
    anti_s = time.time() - t0
    expert = make_model(plan, len(vocab), args.seed + 1, base_config)
    expert.load_state_dict(anti.state_dict())
    for p in anti.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    samples = sample_continuations(anti, everyday_c, plan.samples, 24, args.seed + 4)
    expert_losses = train_expert(expert, anti, facts_c, everyday_c + samples, plan, args.seed + 3)
    expert_s = time.time() - t0

    save_full(anti, vocab, base_dir, args.out / "anti_expert")
    save_full(expert, vocab, base_dir, args.out / "expert")
    write_tasks(cache, tokenizer, args.seed, args.out / "tasks")
    meta = {"plan": asdict(plan), "seed": args.seed, "compact_vocab": len(vocab),
            "examples": {"everyday": len(everyday), "base_on_facts": len(base_on_facts), "facts": len(facts)},
            "final_loss": {"anti_expert": sum(anti_losses[-20:]) / 20, "expert": sum(expert_losses[-20:]) / 20},
            "timings_s": {"anti_expert": round(anti_s, 1), "expert": round(expert_s, 1),
                          "total": round(time.time() - t_start, 1)}}
    previous = args.out / "training.json"
    if args.reuse_anti and previous.exists():  # the anti-expert's figures are those of the run that trained it
        before = json.loads(previous.read_text())
        meta["final_loss"]["anti_expert"] = before["final_loss"]["anti_expert"]
        meta["timings_s"]["anti_expert"] = before["timings_s"]["anti_expert"]
        meta["anti_expert_from"] = {"plan": before["plan"], "reused": True}
    previous.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"saved to {args.out} ({meta['timings_s']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
