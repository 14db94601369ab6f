"""A naive, local proxy-tuning decoder (plain transformers, greedy) for measuring a family without a server.

This is the measuring stick used while training the demo family: three full forward passes per step, no KV
cache, batched with left padding. It follows the paper's prompt handling: the base and the anti-expert see
the chat as a plain transcript ("User: ...\\nAssistant:"), the expert (and a truly tuned model) see it in
their chat template; every chosen token is appended to all sequences. The real numbers come from the server
(`make eval`); this only needs to be right, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

try:  # the engine's transcript template, when the engine package is importable (it is in this repo)
    from proxy_engine.config import DEFAULT_TRANSCRIPT_TEMPLATE as TRANSCRIPT_TEMPLATE
except Exception:  # pragma: no cover - a standalone copy
    TRANSCRIPT_TEMPLATE = (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )


def render(tokenizer, messages: list[dict[str, str]], fmt: str) -> str:
    """'chat': the tokenizer's chat template; 'plain': the engine's plain transcript."""
    if fmt == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if fmt == "plain":
        return tokenizer.apply_chat_template(
            messages, chat_template=TRANSCRIPT_TEMPLATE, add_generation_prompt=True, tokenize=False
        )
    raise ValueError(f"unknown prompt format {fmt!r}")


@dataclass
class Part:
    """One model taking part in decoding: the model, how it sees the prompt, and its weight in the sum."""

    model: torch.nn.Module
    fmt: str
    weight: float


def stop_token_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return {i for i in ids if i is not None}


def _pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def _last_logits(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    ids, mask = _pad_left(seqs, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits[:, -1, :].float()


@torch.no_grad()
def generate(
    parts: list[Part],
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy decoding of sum_i weight_i * logits_i; returns the decoded completions (special tokens dropped)."""
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        prompts = [
            [tokenizer(render(tokenizer, conv, p.fmt), add_special_tokens=False)["input_ids"] for conv in chunk]
            for p in parts
        ]
        generated: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new_tokens):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            total = None
            for p, pp in zip(parts, prompts):
                logits = _last_logits(p.model, [pp[i] + generated[i] for i in active], pad_id)
                width = min(logits.shape[-1], len(tokenizer)) if total is None else total.shape[-1]
                logits = logits[:, :width] * p.weight
                total = logits if total is None else total + logits
            chosen = total.argmax(-1).tolist()
            for i, tok in zip(active, chosen):
                if tok in stops:
                    done[i] = True
                else:
                    generated[i].append(tok)
        results += [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    return results


def load(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model


def family_parts(models: dict[str, torch.nn.Module], alpha: float = 1.0) -> dict[str, list[Part]]:
    """The four ways to answer: base alone, expert alone, proxy-tuned, and the truly tuned model."""
    parts = {
        "base": [Part(models["base"], "plain", 1.0)],
        "expert": [Part(models["expert"], "chat", 1.0)],
        "proxy": [
            Part(models["base"], "plain", 1.0),
            Part(models["expert"], "chat", alpha),
            Part(models["anti_expert"], "plain", -alpha),
        ],
    }
    if "tuned" in models:
        parts["tuned"] = [Part(models["tuned"], "chat", 1.0)]
    return parts
