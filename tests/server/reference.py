"""Naive proxy-tuning, straight from the definition: no KV cache, no batching.

Each step runs every model over its whole token sequence, takes the last position's logits in float32, cuts
the experts' rows to the base vocabulary, combines ``s_base + alpha * (s_expert - s_anti)`` and takes the
argmax. Any cleverness in the engine must reproduce this.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class NaiveProxy:
    def __init__(self, family) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(family.base))
        self.base, self.expert, self.anti = (
            AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            for path in (family.base, family.expert, family.anti_expert)
        )

    @torch.no_grad()
    def _last_logits(self, model, ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids])).logits[0, -1].float()  # [V_model]

    @torch.no_grad()
    def greedy(
        self, prompt_ids: list[int], max_tokens: int, *, alpha: float = 1.0, expert_only: bool = False
    ) -> list[int]:
        """Greedy continuation ignoring EOS (the HTTP side sends ``ignore_eos``)."""
        ids = list(prompt_ids)
        out: list[int] = []
        vocab = self.base.config.vocab_size
        for _ in range(max_tokens):
            if expert_only:
                scores = self._last_logits(self.expert, ids)[:vocab]
            else:
                scores = self._last_logits(self.base, ids)
                if alpha != 0.0:
                    delta = self._last_logits(self.expert, ids)[:vocab] - self._last_logits(self.anti, ids)[:vocab]
                    scores = scores + alpha * delta
            token = int(torch.argmax(scores))
            ids.append(token)
            out.append(token)
        return out

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
