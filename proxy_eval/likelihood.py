"""A model's own log-likelihood of an answer after a chat prompt (plain transformers, teacher forcing).

What the real-base demo's fluency check (``proxy_eval.fluency``) asks of the base model: how likely the base
finds a proxy-tuned answer, token by token, after the very prompt it was asked. Scored locally rather than through
the server: a server whose base sees the ChatML template (``prompt_format: chat``) wraps a raw ``/completions``
prompt in a user turn, so it cannot score an assistant turn that is already written.
"""

from __future__ import annotations

from pathlib import Path

import torch


class AnswerScorer:
    """One causal LM and its tokenizer, scoring answers after the chat template's generation prompt."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def ids(self, messages: list[dict[str, str]], answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids): the template with its generation prompt, then the answer's own tokens."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return prompt, self.tokenizer(answer, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logprobs(self, messages: list[dict[str, str]], answer: str) -> list[float]:
        """The model's log-probability of each answer token, given the prompt and the answer tokens before it."""
        prompt, answer_ids = self.ids(messages, answer)
        if not answer_ids:
            return []
        logits = self.model(input_ids=torch.tensor([prompt + answer_ids])).logits[0].float()
        return token_logprobs(logits, len(prompt), answer_ids)


def token_logprobs(logits: torch.Tensor, start: int, targets: list[int]) -> list[float]:
    """``log p(targets[i])`` read from ``logits`` (``[positions, V]``), where position ``start - 1 + i`` predicts
    ``targets[i]`` (the row before each target: a causal LM's logits predict the next token)."""
    rows = torch.log_softmax(logits[start - 1 : start - 1 + len(targets)], dim=-1)
    return rows.gather(-1, torch.tensor(targets).unsqueeze(-1)).squeeze(-1).tolist()
