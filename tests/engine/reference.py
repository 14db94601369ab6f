"""A naive proxy-tuning reference: no cache, no batching, every model recomputed over its full sequence."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from proxy_engine.text_model import auto_class


def load_whole(path: str) -> torch.nn.Module:
    """The checkpoint at ``path`` as transformers loads it, a vision wrapper whole (the reference runs its forward)."""
    model_type = AutoConfig.from_pretrained(path).model_type
    return auto_class(model_type).from_pretrained(path, dtype=torch.float32).eval()


class NaiveProxy:
    def __init__(self, paths: list[str], vocab_size: int, models: list | None = None) -> None:
        """The models at ``paths``, or ``models`` already loaded (GGUF files, say)."""
        self.models = models or [load_whole(p) for p in paths]
        self.vocab_size = vocab_size

    @torch.no_grad()
    def logits(self, sequences: list[list[int] | None], weights: list[float]) -> torch.Tensor:
        """``sum_m weights[m] * s_m(sequences[m])`` over the models with a nonzero weight, in float32."""
        out = torch.zeros(self.vocab_size, dtype=torch.float64)
        for model, ids, weight in zip(self.models, sequences, weights):
            if weight == 0.0:
                continue
            logits = model(torch.tensor([ids])).logits[0, -1, : self.vocab_size].double()
            out += weight * logits
        return out.float()

    def greedy(
        self, prompts: list[list[int] | None], weights: list[float], steps: int
    ) -> tuple[list[int], list[torch.Tensor]]:
        sequences = [list(p) if p is not None else None for p in prompts]
        tokens, per_step = [], []
        for _ in range(steps):
            logits = self.logits(sequences, weights)
            per_step.append(logits)
            token = int(logits.argmax())
            tokens.append(token)
            for seq in sequences:
                if seq is not None:
                    seq.append(token)
        return tokens, per_step
