"""Train the demo proxy-tuning family from scratch on a CPU: the miniature version of the paper's experiment.

    python -m scripts.train_demo --out demo/models            # the full run (committed family)
    python -m scripts.train_demo --out /tmp/demo --quick      # a shortened end-to-end run (tests)

What it does (all seeded and deterministic):
1. builds a synthetic world of invented people with facts (town, job, pet, favourite colour), see
   ``scripts/demo_data.py``, and trains one byte-level BPE tokenizer on its text;
2. pretrains a **large base** and a **small base** (LlamaForCausalLM) from scratch on the same prose about
   *all* people; the large one memorises more of it;
3. fine-tunes the small base into the **expert** and the large base into the **truly tuned** reference on
   chat question answering about the *training half* of the people (the small base, untouched, is the
   **anti-expert**);
4. writes the evaluation task file (questions about the held-out half) and measures base / expert /
   proxy-tuned / truly tuned locally (naive greedy decoding, ``proxy_eval.local``), with the gap closed.

Outputs: ``OUT/{base,anti_expert,expert,tuned}`` (save_pretrained, safetensors), ``OUT/metrics.json``, and the
task file (``--tasks``, default ``demo/tasks/heldout.jsonl``; in ``--quick`` mode ``OUT/heldout.jsonl``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy_engine.families import CHAT_TEMPLATE, Shape, build_tokenizer  # noqa: E402
from proxy_eval import local as local_eval  # noqa: E402
from proxy_eval.metrics import contains, gap_closed, score  # noqa: E402
from scripts import demo_data  # noqa: E402


@dataclass
class Plan:
    n_people: int = 240
    vocab_size: int = 1024
    large: Shape = Shape(layers=4, hidden=256, heads=8, kv_heads=8, intermediate=512)
    small: Shape = Shape(layers=2, hidden=96, heads=4, kv_heads=4, intermediate=192)
    block: int = 128
    docs_per_person: int = 16
    pretrain_steps: int = 700
    pretrain_batch: int = 32
    lr_large: float = 1e-3
    lr_small: float = 2e-3
    finetune_steps: int = 200
    finetune_batch: int = 32
    finetune_lr: float = 3e-4
    finetune_mix: float = 0.25  # fraction of each fine-tuning batch drawn from pretraining prose
    eval_limit: int = 240  # held-out questions in the task file
    max_new_tokens: int = 12


QUICK = Plan(
    n_people=24,
    vocab_size=400,
    large=Shape(layers=2, hidden=64, heads=4, kv_heads=4, intermediate=128),
    small=Shape(layers=1, hidden=32, heads=2, kv_heads=2, intermediate=64),
    block=64,
    docs_per_person=4,
    pretrain_steps=20,
    pretrain_batch=8,
    finetune_steps=10,
    finetune_batch=8,
    eval_limit=16,
    max_new_tokens=6,
)


def log(msg: str) -> None:
    print(f"[train_demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_model(shape: Shape, tokenizer, seed: int, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    stops = sorted(local_eval.stop_token_ids(tokenizer))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pack_blocks(docs: list[str], tokenizer, block: int) -> torch.Tensor:
    """Concatenate documents (separated by end-of-text) and cut into ``block``-token rows."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += ids + [eos]
    rows = len(stream) // block
    return torch.tensor(stream[: rows * block], dtype=torch.long).view(rows, block)


def pretrain(model, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int, name: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        idx = torch.randint(0, blocks.shape[0], (batch,), generator=gen)
        x = blocks[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
            recent = sum(losses[-20:]) / len(losses[-20:])
            log(f"pretrain {name}: step {step + 1}/{steps} loss {recent:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def chat_examples(tokenizer, pairs: list[tuple[str, str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) for chat QA: the loss covers the answer and its closing <|end|> only."""
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    out = []
    for question, value, attr in pairs:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
            tokenize=False,
        )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(demo_data.answer_text(attr, value), add_special_tokens=False)["input_ids"] + [end_id]
        out.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return out


def finetune(model, examples, blocks: torch.Tensor, plan: Plan, seed: int, name: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=plan.finetune_lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pad = 0
    model.train()
    losses = []
    t0 = time.time()
    n_mix = int(round(plan.finetune_batch * plan.finetune_mix))
    n_chat = plan.finetune_batch - n_mix
    for step in range(plan.finetune_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, plan.finetune_steps, plan.finetune_lr, warmup=max(1, plan.finetune_steps // 10))
        batch = [examples[rng.randrange(len(examples))] for _ in range(n_chat)]
        width = max(len(ids) for ids, _ in batch)
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        m = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, labels) in enumerate(batch):
            x[i, : len(ids)] = torch.tensor(ids)
            y[i, : len(ids)] = torch.tensor(labels)
            m[i, : len(ids)] = 1
        loss = model(input_ids=x, attention_mask=m, labels=y).loss
        if n_mix:
            idx = torch.randint(0, blocks.shape[0], (n_mix,), generator=gen)
            xb = blocks[idx]
            loss = (loss * n_chat + model(input_ids=xb, labels=xb).loss * n_mix) / plan.finetune_batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, plan.finetune_steps // 5) == 0 or step == plan.finetune_steps - 1:
            recent = sum(losses[-20:]) / len(losses[-20:])
            log(f"finetune {name}: step {step + 1}/{plan.finetune_steps} loss {recent:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def save(model, tokenizer, directory: Path, chat: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    tokenizer.save_pretrained(directory)
    if not chat:
        for name in ("chat_template.jinja", "chat_template.json"):
            (directory / name).unlink(missing_ok=True)
    portable_tokenizer_config(directory)
    greedy_generation_config(directory)


def greedy_generation_config(directory: Path) -> None:
    """``"do_sample": false`` written out (save_pretrained leaves it out: transformers' default), so that a server
    reading the file for its defaults (proxy-serve's --generation-config auto) decodes greedily, as the
    evaluation does: a chat frontend that sends no temperature then gets the answers `make eval` scored, every
    time, instead of a 3M-parameter model's draws at temperature 1 (docs/demo.md)."""
    path = directory / "generation_config.json"
    config = json.loads(path.read_text())
    config["do_sample"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# transformers 5 writes its own class name and keys, which transformers 4.x cannot read (evaluation harnesses
# pin 4.x): the class both read, and the 4.x name of the special-token list (5.x reads it too).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_V5_ONLY_KEYS = ("backend", "is_local", "local_files_only")


def portable_tokenizer_config(directory: Path) -> None:
    """Rewrite ``directory/tokenizer_config.json`` so that transformers 4.x and 5.x both load it."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif isinstance(extra, dict) and extra:
        config["extra_special_tokens"] = extra
    for key in _V5_ONLY_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def cloze_accuracy(model, tokenizer, people: list[demo_data.Person]) -> float:
    """How much of the pretraining prose a base holds: greedy first answer token after '<name> lives in' etc."""
    prompts, answers = [], []
    for person in people:
        for attr, value in person.facts.items():
            template = demo_data.FACT_TEMPLATES[attr][0]
            prefix, _ = template.split("{v}")
            prompts.append(prefix.format(n=person.name).rstrip())
            answers.append(" " + value)
    hits = 0
    for start in range(0, len(prompts), 128):
        chunk = prompts[start:start + 128]
        seqs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        logits = local_eval._last_logits(model, seqs, tokenizer.pad_token_id)
        for row, answer in zip(logits.argmax(-1).tolist(), answers[start:start + 128]):
            hits += row == tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    return hits / len(prompts)


def evaluate(models: dict, tokenizer, rows: list[dict], max_new_tokens: int, alpha: float = 1.0) -> dict:
    parts = local_eval.family_parts(models, alpha=alpha)
    conversations = [r["messages"] for r in rows]
    results = {}
    for name, pp in parts.items():
        t0 = time.time()
        outputs = local_eval.generate(pp, tokenizer, conversations, max_new_tokens=max_new_tokens)
        scores = [score(r["metric"], o, r["reference"], r.get("choices")) for r, o in zip(rows, outputs)]
        found = [contains(o, r["reference"]) for r, o in zip(rows, outputs)]
        results[name] = {"score": sum(scores) / len(scores), "contains": sum(found) / len(found), "outputs": outputs}
        log(f"eval {name}: {results[name]['score']:.3f} (contains {results[name]['contains']:.3f}, "
            f"{time.time() - t0:.0f}s)")
    return results


def report(results: dict, rows: list[dict]) -> dict:
    table = {name: r["score"] for name, r in results.items()}
    ratio, reason = gap_closed(table["base"], table["proxy"], table["tuned"])
    print(f"{'model':<8} exact_match  contains (answer anywhere, format ignored)")
    for name in ("base", "expert", "proxy", "tuned"):
        print(f"{name:<8} {table[name]:>11.3f}  {results[name]['contains']:.3f}")
    print(f"gap closed: {ratio * 100:.1f}%" if ratio is not None else f"gap closed: n/a ({reason})")
    for i in range(min(3, len(rows))):
        q = rows[i]["messages"][-1]["content"]
        print(f"\nQ: {q}  (reference: {rows[i]['reference']})")
        for name in ("base", "expert", "proxy", "tuned"):
            print(f"  {name:<7} {results[name]['outputs'][i]!r}")
    return {"scores": table, "contains": {name: r["contains"] for name, r in results.items()}, "gap_closed": ratio,
            "gap_closed_reason": reason}


def _job(kind: str, name: str, spec: dict) -> dict:
    """One training job (a worker process): pretrain a base from scratch, or fine-tune a saved base."""
    from transformers import AutoTokenizer

    torch.set_num_threads(spec["threads"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    t0 = time.time()
    if kind == "pretrain":
        model = make_model(spec["shape"], tokenizer, seed=spec["seed"], max_positions=spec["max_positions"])
        log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
        pretrain(model, spec["blocks"], spec["plan"].pretrain_steps, spec["plan"].pretrain_batch, spec["lr"],
                 spec["seed"] + 100, name)
        save(model, tokenizer, spec["out"], chat=False)
    else:
        model = local_eval.load(spec["init"])
        finetune(model, spec["examples"], spec["blocks"], spec["plan"], spec["seed"], name)
        save(model, tokenizer, spec["out"], chat=True)
    return {"name": name, "seconds": time.time() - t0}


def run_jobs(jobs: list[tuple[str, str, dict]], parallel: bool) -> dict[str, float]:
    """Run the jobs, two at a time in separate processes (one thread each) unless ``parallel`` is off.

    Two single-threaded processes use a 2-core machine better than one process with two threads, and
    degrade far more gracefully when the cores are shared.
    """
    if parallel and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(2, len(jobs))) as pool:
            results = pool.starmap(_job, jobs)
    else:
        results = [_job(*job) for job in jobs]
    return {r["name"]: r["seconds"] for r in results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "demo" / "models")
    ap.add_argument("--tasks", type=Path, default=None, help="task file (default demo/tasks/heldout.jsonl; "
                    "OUT/heldout.jsonl with --quick)")
    ap.add_argument("--quick", action="store_true", help="a tiny end-to-end run (seconds), for tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--sequential", action="store_true", help="train in this process, one model after another")
    ap.add_argument("--reuse-bases", action="store_true",
                    help="keep OUT/base and OUT/anti_expert instead of pretraining (to iterate on fine-tuning)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-only", action="store_true",
                    help="train nothing: re-measure the family saved in OUT (keeps the recorded timings)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a plan field")
    args = ap.parse_args(argv)

    plan = copy.deepcopy(QUICK if args.quick else Plan())
    for item in args.set:
        key, value = item.split("=", 1)
        current = getattr(plan, key)
        setattr(plan, key, type(current)(value))
    torch.set_num_threads(max(1, min(args.threads * 2, os.cpu_count() or 1)))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tasks_path = args.tasks or (out / "heldout.jsonl" if args.quick else ROOT / "demo" / "tasks" / "heldout.jsonl")
    timings: dict[str, float] = {}
    t_start = time.time()

    world = demo_data.make_world(plan.n_people, seed=args.seed)
    log(f"world: {len(world.people)} people, {len(world.train)} fine-tuned on, {len(world.heldout)} held out")
    docs = demo_data.pretraining_documents(world, plan.docs_per_person, seed=args.seed + 1)
    max_positions = max(256, plan.block)
    parallel = not (args.sequential or args.quick)

    if args.eval_only:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out / "base"))
        old = out / "metrics.json"
        timings = json.loads(old.read_text()).get("timings", {}) if old.exists() else {}
    elif args.reuse_bases:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out / "base"))
        blocks = pack_blocks(docs, tokenizer, plan.block)
    else:
        tokenizer = build_tokenizer(plan.vocab_size, corpus=demo_data.tokenizer_corpus(world, seed=args.seed + 2))
        save_dir = out / "base"
        save_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(save_dir)  # the workers load this one tokenizer
        blocks = pack_blocks(docs, tokenizer, plan.block)
        log(f"tokenizer: {len(tokenizer)} tokens; corpus {blocks.numel()} tokens in {blocks.shape[0]} blocks")
        common = {"plan": plan, "blocks": blocks, "tokenizer_dir": str(save_dir), "threads": args.threads,
                  "max_positions": max_positions}
        t0 = time.time()
        timings.update({f"pretrain {k}_s": v for k, v in run_jobs([
            ("pretrain", "large base", {**common, "shape": plan.large, "lr": plan.lr_large, "seed": args.seed + 10,
                                        "out": out / "base"}),
            ("pretrain", "small base", {**common, "shape": plan.small, "lr": plan.lr_small, "seed": args.seed + 11,
                                        "out": out / "anti_expert"}),
        ], parallel).items()})
        timings["pretrain_wall_s"] = time.time() - t0

    if not args.eval_only:
        train_and_save(args, plan, world, tokenizer, blocks, out, parallel, timings)
        timings["train_total_s"] = time.time() - t_start

    return finish(args, plan, world, out, tasks_path, timings, t_start)


def train_and_save(args, plan: Plan, world, tokenizer, blocks, out: Path, parallel: bool, timings: dict) -> None:
    t0 = time.time()
    examples = chat_examples(tokenizer, demo_data.qa_pairs(world.train, seed=args.seed + 3))
    common = {"plan": plan, "blocks": blocks, "tokenizer_dir": str(out / "base"), "threads": args.threads,
              "examples": examples}
    timings.update({f"finetune {k}_s": v for k, v in run_jobs([
        ("finetune", "tuned (large)", {**common, "init": out / "base", "seed": args.seed + 31, "out": out / "tuned"}),
        ("finetune", "expert (small)", {**common, "init": out / "anti_expert", "seed": args.seed + 30,
                                        "out": out / "expert"}),
    ], parallel).items()})
    timings["finetune_wall_s"] = time.time() - t0


def finish(args, plan: Plan, world, out: Path, tasks_path: Path, timings: dict, t_start: float) -> int:
    rows = demo_data.heldout_tasks(world, seed=args.seed + 4, limit=plan.eval_limit)
    tasks_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tasks_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    log(f"wrote {len(rows)} held-out tasks to {tasks_path}")

    metrics: dict = {"plan": asdict(plan), "seed": args.seed, "timings": timings}
    if not args.no_eval:
        t0 = time.time()
        # Measure the saved family (what the server will load), not the in-memory copies.
        models = {name: local_eval.load(out / name) for name in ("base", "expert", "anti_expert", "tuned")}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out / "expert"))  # the one with the chat template
        metrics["cloze_all_people"] = {
            "large_base": cloze_accuracy(models["base"], tokenizer, world.people),
            "small_base": cloze_accuracy(models["anti_expert"], tokenizer, world.people),
        }
        log(f"cloze accuracy (pretraining facts held): {metrics['cloze_all_people']}")
        results = evaluate(models, tokenizer, rows, plan.max_new_tokens)
        metrics["heldout"] = report(results, rows)
        metrics["heldout"]["examples"] = [
            {"question": r["messages"][-1]["content"], "reference": r["reference"],
             **{name: results[name]["outputs"][i] for name in results}}
            for i, r in enumerate(rows[:5])
        ]
        train_rows = demo_data.heldout_tasks(
            demo_data.World(world.people, world.heldout, world.train), seed=args.seed + 5,
            limit=min(80, plan.eval_limit),
        )
        train_results = evaluate(models, tokenizer, train_rows, plan.max_new_tokens)
        metrics["fine_tuned_people"] = {name: r["score"] for name, r in train_results.items()}
        timings["eval_s"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"done in {time.time() - t_start:.0f}s; metrics in {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
