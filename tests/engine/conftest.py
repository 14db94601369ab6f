from __future__ import annotations

import pytest

from proxy_engine.config import EngineConfig, ExpertPairConfig, LimitsConfig, ModelConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import FinishReason, PromptInput, SamplingParams, Target


def engine_config(family, *, chat_expert: bool = False, alpha: float = 1.0, **limits) -> EngineConfig:
    return EngineConfig(
        base=ModelConfig(path=str(family.base)),
        experts=[
            ExpertPairConfig(
                expert=ModelConfig(path=str(family.expert), prompt_format="chat" if chat_expert else "plain"),
                anti_expert=ModelConfig(path=str(family.anti_expert)),
                alpha=alpha,
            )
        ],
        limits=LimitsConfig(**limits),
    )


@pytest.fixture(scope="module")
def chat_models(chat_family):
    return load_models(engine_config(chat_family, chat_expert=True))


@pytest.fixture(scope="module")
def plain_models(tiny_family):
    """Every model on plain prompts (what prompt logprobs need)."""
    return load_models(engine_config(tiny_family))


def make_engine(models, family, *, chat_expert: bool = True, **limits) -> ProxyEngine:
    return ProxyEngine(models, engine_config(family, chat_expert=chat_expert, **limits))


def submit(engine: ProxyEngine, request_id: str, prompt: str | list | None = None, target=Target.PROXY, **params):
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt_input = PromptInput(messages=prompt)
    elif isinstance(prompt, list):
        prompt_input = PromptInput(token_ids=prompt)
    else:
        prompt_input = PromptInput(text=prompt or "Hello")
    sequences = engine.make_sequences(request_id, prompt_input, SamplingParams(**params), target)
    engine.add(sequences)
    return sequences


def run_to_end(engine: ProxyEngine, max_steps: int = 500) -> dict[tuple[str, int], dict]:
    """Step until idle; collect per (request, choice) the tokens, text and finish reason."""
    results: dict[tuple[str, int], dict] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for output in engine.step():
            entry = results.setdefault((output.request_id, output.index), {"tokens": [], "text": "", "finish": None})
            entry["tokens"] += output.new_token_ids
            entry["text"] += output.text_delta
            if output.finished:
                entry["finish"] = output.finish_reason
                entry["stop_reason"] = output.stop_reason
                entry["error"] = output.error
                entry["completion_tokens"] = output.completion_tokens
    return results


__all__ = ["FinishReason", "engine_config", "make_engine", "run_to_end", "submit"]
