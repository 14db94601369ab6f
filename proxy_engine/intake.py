"""Request intake: a request's prompt and parameters in, its ``n`` sequences out, or a ``ValueError`` saying
what is wrong (the server's 400).

    intake = Intake(models, config, max_lens, vocab_size, eos_ids, outputs, device)
    sequences = intake.make_sequences(request_id, prompt, params, target)

It runs on the caller's thread (the server's request handler), never the step thread: rendering each model's
prompt, checking it against each model's context, and compiling a structured-output grammar all happen here,
so the step loop only ever sees sequences that are ready to run. It touches no tensor but the sequences'
generators.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from proxy_engine.bad_words import bad_word_token_ids
from proxy_engine.config import EngineConfig
from proxy_engine.grammar import GrammarCompiler
from proxy_engine.layout import ModelLayout
from proxy_engine.loader import LoadedModel
from proxy_engine.outputs import OutputBuilder
from proxy_engine.request import (
    ContextLengthError,
    FieldError,
    PairNotFoundError,
    PromptInput,
    PromptTokens,
    SamplingParams,
    Serves,
    Target,
)
from proxy_engine.sequence import Sequence
from proxy_engine.thinking_budget import ThinkingBudget
from proxy_engine.tool_calls import DEFAULT_FORMAT, detect_format, renders_tools


def resolve_tool_call_format(config: EngineConfig, models: list[LoadedModel]) -> str | None:
    """The configured tool-call format, or (``auto``) the one the chat templates write: a chat-format model's
    template first (the expert's, usually), then any tokenizer's; the first that renders tools decides. None when
    no template renders tools: the family was not tuned to call them (the server then answers ``tool_choice``
    auto without the tools, docs/frontends.md)."""
    if config.tool_call_format != "auto":
        return config.tool_call_format
    templates = [m.renderer.chat_template for m in models if m.renderer.prompt_format == "chat"]
    templates += [m.renderer.chat_template for m in models]
    template = next((t for t in templates if renders_tools(t)), None)
    return detect_format(template) if template is not None else None


def truncated(ids: list[int], keep: int | None, limit: int, max_tokens: int | None) -> list[int]:
    """``ids`` cut to their last ``keep`` tokens (vLLM's ``truncate_prompt_tokens``); ``keep`` -1: to what fits
    a context of ``limit`` tokens beside ``max_tokens`` (beside one token when it is None)."""
    if keep is None:
        return ids
    if keep == -1:
        keep = max(1, limit - (1 if max_tokens is None else max_tokens))
    return ids[-keep:]


def context_left(prompts: dict[int, list[int]], max_tokens: int | None, limits: list[int], roles: list[str]) -> int:
    """The completion tokens allowed: ``max_tokens``, or (when it is None) the context every model has left.

    ``ValueError`` (a 400, as OpenAI and vLLM answer) when a prompt plus ``max_tokens`` does not fit a model's
    context; a missing ``max_tokens`` needs room for one token. A prompt may fill the whole context only when
    nothing is to follow it (``max_tokens`` 0: scoring).
    """
    left = 10**18
    for index, ids in prompts.items():
        limit, role = limits[index], roles[index]
        if max_tokens is None and len(ids) >= limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens, but the prompt is {len(ids)} tokens as "
                f"the {role} model sees it, which leaves no room for a completion; shorten the prompt", "prompt"
            )
        if max_tokens is not None and len(ids) + max_tokens > limit:
            if max_tokens == 0:
                raise ContextLengthError(
                    f"This model's maximum context length is {limit} tokens, but the prompt is {len(ids)} tokens "
                    f"as the {role} model sees it; shorten the prompt", "prompt"
                )
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt as the {role} model sees it, "
                f"{max_tokens} in max_tokens). Please reduce the length of the prompt or max_tokens", "max_tokens"
            )
        left = min(left, limit - len(ids))
    return max_tokens if max_tokens is not None else left


def check_scorable(prompts: dict[int, list[int]], models: list[LoadedModel]) -> None:
    """Prompt logprobs need every model of the request to read the same tokens (a chat-format model reads its
    template around them: its position p is not the others' position p)."""
    for index in prompts:
        model = models[index]
        if model.renderer.prompt_format != "plain":
            remedy = ("serve the base with prompt_format: plain to score prompts" if model.role == "base" else
                      "score with the base alone, or serve the pair with prompt_format: plain")
            raise ValueError(
                f"prompt logprobs (prompt_logprobs, or echo with logprobs) score the prompt's own tokens, which "
                f"every model must read as plain text; the {model.role} model uses its chat format "
                f"(prompt_format: chat), which wraps a prompt in its template, so its tokens are not the prompt's: "
                f"{remedy}"
            )
    if len({tuple(ids) for ids in prompts.values()}) > 1:
        raise ValueError("prompt logprobs need the models to tokenize the prompt alike, and they do not")


@dataclass(eq=False)
class Intake:
    """Validates, renders and numbers requests into sequences (any thread)."""

    models: list[LoadedModel]
    config: EngineConfig
    max_lens: list[int]  # each model's context, capped by limits.max_model_len
    vocab_size: int
    eos_ids: frozenset[int]
    outputs: OutputBuilder  # makes each sequence's detokenizer
    device: torch.device  # where the sequences' sampling generators live

    def __post_init__(self) -> None:
        self.layout = ModelLayout.of(self.config)
        if len(self.layout.slots) != len(self.models):
            raise ValueError(f"{len(self.models)} models loaded for a deployment of {len(self.layout.slots)} "
                             "distinct models (load them with load_models)")
        # Structured outputs: compiled where prompts render (off the step thread), cached by constraint.
        limits = self.config.limits
        self.grammars = GrammarCompiler(self.models[0].tokenizer, self.vocab_size, self.eos_ids,
                                        cache_bytes=limits.grammar_cache_mb * 2**20,
                                        compile_timeout_s=limits.grammar_compile_timeout_s)
        self.tool_call_format = resolve_tool_call_format(self.config, self.models)
        for model in self.models:  # a named or required call still shows plain models the tools, in some format
            model.renderer.tool_format = self.tool_call_format or DEFAULT_FORMAT
        self._lock = threading.Lock()
        self._next_seq_id = 0
        self._seed_rng = random.Random(self.config.seed)

    @property
    def num_pairs(self) -> int:
        return len(self.layout.pairs)

    def _thinking_budgets(self, params: SamplingParams) -> Callable[[], ThinkingBudget | None]:
        """Each sequence's count of thinking tokens, if the request set a budget (one per choice, the closing tag
        it forces tokenized once, as the shared tokenizer writes it alone)."""
        budget, tags = params.thinking_token_budget, params.thinking_tags
        if budget is None or tags is None:
            return lambda: None
        close_ids = tuple(self.models[0].tokenizer.encode(tags.closes[0], add_special_tokens=False))
        return lambda: ThinkingBudget(budget, tags, close_ids)

    def weights_for(self, params: SamplingParams, target: Target, layout: ModelLayout | None = None) -> list[float]:
        """Each model's weight: base 1, expert_i +alpha_i, anti_i -alpha_i (or one model alone); a model that
        plays several roles sums theirs (layout.py). ``layout``: the snapshot the request is rendered with."""
        layout = layout or self.layout
        pairs = len(layout.pairs)
        if target.pair is not None and not 0 <= target.pair < pairs:
            raise ValueError(f"this deployment has no expert pair {target.pair}")
        if target.pair in layout.retired:  # unloaded since the server resolved the model id
            raise PairNotFoundError(f"the expert pair this request names (pair {target.pair}) has been removed")
        if target.serves is Serves.EXPERT:
            if not pairs:
                raise ValueError("this deployment has no expert to serve alone")
            return layout.expert_weights(target.expert_pair)
        if target.serves is Serves.PROXY:
            return layout.proxy_weights(params.resolve_alphas(list(layout.alphas), target.pair, list(layout.members)))
        return layout.base_weights()

    def render(self, prompt: PromptInput, target: Target = Target.PROXY) -> list[int]:
        """The primary model's prompt ids (the base, or the expert when it is served alone)."""
        return self._primary(target).renderer.render(prompt)

    def tokens(self, prompt: PromptInput, target: Target = Target.PROXY) -> PromptTokens:
        """``render``'s ids with the text they came from and where each lies in it."""
        return self._primary(target).renderer.tokens(prompt)

    def _primary(self, target: Target):
        """The model whose tokens the request's text is counted in: the base, or the expert served alone."""
        return self.models[self.layout.expert_slot(target.expert_pair) if target.serves is Serves.EXPERT else 0]

    def make_sequences(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        target: Target = Target.PROXY,
        first_index: int = 0,
    ) -> list[Sequence]:
        """Validate and render a request into its ``n`` sequences; ``ValueError`` says what is wrong.

        Their choice indices start at ``first_index`` (a request with several prompts numbers prompt ``i``'s
        choices from ``i * n``, as OpenAI does).
        """
        layout = self.layout  # one snapshot: a running engine may add or remove a pair meanwhile
        params.validate(self.vocab_size, len(layout.pairs), self.config.limits.max_logprobs, target.pair,
                        list(layout.members))
        if params.priority and self.config.limits.scheduling_policy != "priority":
            raise FieldError("priority needs the priority scheduling policy (--scheduling-policy priority); this "
                             "server admits requests in arrival order", "priority")
        if params.model_logprobs is not None and target.serves is not Serves.PROXY:
            raise FieldError(
                "model_logprobs explains the proxy-tuned combination: ask it of the proxy-tuned model, not of one "
                "model alone (every model's distribution is in its answer)", "model_logprobs"
            )
        if prompt.token_ids is not None and any(not 0 <= t < self.vocab_size for t in prompt.token_ids):
            raise FieldError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt.continuation):
            raise FieldError(f"continuation token ids must be in [0, {self.vocab_size})", "prompt")
        weights = self.weights_for(params, target, layout)
        # model_logprobs shows every model of the combination, even one whose weights cancel (alpha 0).
        shown = layout.slots_of(layout.members if target.pair is None else [target.pair]) \
            if params.model_logprobs is not None else set()
        prompts = {
            index: truncated(self.models[index].renderer.render(prompt), prompt.truncate, self.max_lens[index],
                             params.max_tokens) + list(prompt.continuation)
            for index, weight in enumerate(weights) if weight != 0.0 or index in shown
        }
        left = context_left(prompts, params.max_tokens, self.max_lens, [m.role for m in self.models])
        if params.max_tokens is None and params.default_max_tokens:
            left = min(left, params.default_max_tokens)
        if params.prompt_logprobs is not None:
            check_scorable(prompts, self.models)
        if params.min_tokens > left:
            raise FieldError(f"min_tokens ({params.min_tokens}) exceeds the context left ({left} tokens)", "min_tokens")
        deadline = None
        if self.config.limits.request_timeout_s:
            deadline = time.monotonic() + self.config.limits.request_timeout_s
        structured = params.structured  # compiled (or found cached) here: a bad constraint is a ValueError
        # A spelling with a token past the shared vocabulary can never be generated: nothing to ban.
        bad_word_ids = tuple(ids for ids in bad_word_token_ids(self.models[0].tokenizer, params.bad_words or [])
                             if max(ids) < self.vocab_size)
        thinking = self._thinking_budgets(params)
        sequences = []
        for choice in range(first_index, first_index + params.n):
            seed = params.seed + choice if params.seed is not None else self._seed_rng.getrandbits(63)
            with self._lock:
                seq_id = self._next_seq_id
                self._next_seq_id += 1
            replay = params.replay[choice] if params.replay is not None else None
            sequences.append(Sequence(
                seq_id=seq_id, request_id=request_id, index=choice, params=params, weights=weights,
                prompts=prompts, max_tokens=left if replay is None else min(left, len(replay)), replay=replay,
                detokenizer=self.outputs.detokenizer(params, prompts[min(prompts)]),
                # On the logits' device: torch.multinomial draws with a generator of the probabilities' device.
                generator=torch.Generator(device=self.device).manual_seed(seed), eos_ids=self.eos_ids,
                deadline=deadline, grammar=self.grammars.matcher(structured) if structured is not None else None,
                cache_salt=prompt.cache_salt, bad_word_ids=bad_word_ids,
                thinking=thinking(), pair=target.pair,
            ))
        return sequences
