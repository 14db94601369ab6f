"""The real base's own greedy answers, cached in a JSONL file: what the real-base demo distils and compares to.

    python -m scripts.base_answers              # fills demo/real/base_answers.jsonl (only the missing questions)

One row per question: ``{"question", "ids", "text", "ended"}``: the answer's token ids (at most
``MAX_NEW_TOKENS``), its text, and whether the base ended it (``<|im_end|>``) within the budget. Questions are
answered in left-padded batches (the float32 sums then differ from the server's unpadded ones in the last
bits, which can turn a near-tie; the evaluation reports the base's own agreement with these references). Rows
already in the file are kept, so an interrupted run resumes and a finished file costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import real_base, real_demo_data  # noqa: E402

CACHE = ROOT / "demo" / "real" / "base_answers.jsonl"
MAX_NEW_TOKENS = 24
BATCH = 32


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt every model of the real demo sees: the ChatML template with the default system turn."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_cache(path: Path = CACHE) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["question"]: row for row in rows}


@torch.no_grad()
def answer_batch(model, tokenizer, questions: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    prompts = [chat_prompt_ids(tokenizer, q) for q in questions]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    rows = []
    for question, generated in zip(questions, out[:, width:].tolist()):
        ended = tokenizer.eos_token_id in generated
        if ended:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        rows.append({"question": question, "ids": generated, "ended": ended,
                     "text": tokenizer.decode(generated, skip_special_tokens=True)})
    return rows


def all_questions() -> list[str]:
    """Every question whose base answer the demo uses, the most needed first (a slow machine can train on a
    prefix): the held-out everyday questions (the evaluation's references), one trained phrasing of every fourth
    fact (the base's answer to a fact question is what the anti-expert learns the base says there; the base
    answers them all alike), then the everyday questions to distil."""
    train, held = real_demo_data.everyday_split()
    facts: list[str] = []
    seen: set[str] = set()
    for row in real_demo_data.fact_rows(real_demo_data.fact_people()):
        if row["split"] == "train" and row["id"] not in seen:
            seen.add(row["id"])
            if len(seen) % 4 == 1:
                facts.append(row["question"])
    return held + facts + train


def fill(path: Path = CACHE, base_dir: Path | None = None, questions: list[str] | None = None) -> dict[str, dict]:
    """Answer every question missing from the cache, appending to it as it goes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = load_cache(path)
    todo = [q for q in (questions or all_questions()) if q not in cache]
    if not todo:
        return cache
    base_dir = base_dir or real_base.convert()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with path.open("a") as f:
        for start in range(0, len(todo), BATCH):
            for row in answer_batch(model, tokenizer, todo[start:start + BATCH]):
                cache[row["question"]] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            done = min(start + BATCH, len(todo))
            print(f"[base_answers] {done}/{len(todo)} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    return cache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = fill(args.cache)
    print(f"{len(cache)} answers in {args.cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
