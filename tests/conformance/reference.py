"""What a completion must be, computed the slow way: a naive full-recompute proxy and the text rule.

The text rule: a completion's text is ``decode(prompt + output) - decode(prompt)`` (special tokens skipped), so
a SentencePiece tokenizer's leading space, a byte-fallback character split over tokens and a byte-level
character split over tokens all come out as the full decode has them.
"""

from __future__ import annotations

from tests.engine.reference import NaiveProxy

__all__ = ["NaiveProxy", "completion_text", "per_model_prompts"]


def completion_text(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    after = tokenizer.decode(list(prompt_ids) + list(output_ids), skip_special_tokens=True)
    assert after.startswith(before), (before, after)
    return after[len(before):]


def per_model_prompts(family, tokenizers, prompt, transcript, continue_final: bool = False) -> list[list[int]]:
    """Each model's prompt ids, rendered independently of the engine: a chat expert through its own template
    (``apply_chat_template``), base and anti-expert through the transcript (chat) or as the plain text.
    ``continue_final``: the final (assistant) message is left open, the transcript cut where its content ends."""
    base_tok, expert_tok, _ = tokenizers
    if isinstance(prompt, str):
        plain = base_tok(prompt)["input_ids"]
        messages = [{"role": "user", "content": prompt}]
    elif continue_final:
        closed = transcript.render(messages=prompt, add_generation_prompt=False)
        content = prompt[-1]["content"]
        plain = base_tok(closed[: closed.rindex(content) + len(content)])["input_ids"]
        messages = prompt
    else:
        plain = base_tok(transcript.render(messages=prompt, add_generation_prompt=True))["input_ids"]
        messages = prompt
    if family.chat_expert:
        expert = expert_tok.apply_chat_template(messages, add_generation_prompt=not continue_final,
                                                continue_final_message=continue_final, tokenize=True,
                                                return_dict=False)
        expert = list(expert["input_ids"] if isinstance(expert, dict) else expert)
    else:
        expert = plain
    return [plain, expert, plain]
