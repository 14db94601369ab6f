"""What crosses the engine boundary: a prompt and sampling parameters in, ``RequestOutput`` deltas out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from proxy_engine.config import DEFAULT_MAX_LOGPROBS, EngineConfig
from proxy_engine.grammar import StructuredOutput

# Template variables a request may not set through template_kwargs: the renderer's own (and transformers'
# apply_chat_template parameters, which would otherwise be taken for its options).
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
})
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_N = 16
MAX_LOGPROBS = DEFAULT_MAX_LOGPROBS  # the default cap (LimitsConfig.max_logprobs sets the engine's)
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # OpenAI's own limit on logit_bias entries
MAX_BAD_WORDS = 64
# Below this a temperature is sampled greedily (vLLM's rule): the limit of softmax(logits / T) as T -> 0, and
# logits / T would overflow float32 (1e-39 is a float32 subnormal: the division gives inf, then NaN).
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 1e4  # past it float32 turns T into inf and -inf / inf into NaN; 1e4 is already uniform
# logits / r and logits * r stay finite in float32 for any logit a model gives; outside, 1e-300 rounds to 0.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


class _Wire(str, Enum):
    """An enum whose members are their wire strings: ``str()``, ``%s``, f-strings and JSON give the value."""

    def __str__(self) -> str:
        return self.value


class FinishReason(_Wire):
    """Why a sequence ended; the string value is the OpenAI ``finish_reason``."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class ErrorCode(_Wire):
    """The ``code`` of every error a client can get, engine's and server's alike (OpenAI's error ``code``)."""

    # A request failed after it was accepted (RequestOutput.error_code, the stream's error event).
    INTERNAL_ERROR = "internal_error"  # a fault in the engine step (or a bug): the other requests keep going
    NO_TOKEN_ALLOWED = "no_token_allowed"  # the request's own constraints left no token to write (a 400)
    TIMEOUT = "timeout"  # limits.request_timeout_s ran out
    SHUTDOWN = "shutdown"  # SIGTERM's grace period ran out first
    # Refused before it started (HTTP status only).
    DRAINING = "draining"
    SERVER_OVERLOADED = "server_overloaded"
    LOADING = "loading"
    LOAD_FAILED = "load_failed"
    MODEL_NOT_FOUND = "model_not_found"
    ADAPTER_NOT_FOUND = "adapter_not_found"  # /v1/load_lora_adapter's path, /v1/unload_lora_adapter's name
    INVALID_API_KEY = "invalid_api_key"
    REQUEST_TOO_LARGE = "request_too_large"
    NOT_FOUND = "not_found"  # no such endpoint
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PROMPT_TOO_LONG = "prompt_too_long"  # max_prompt_chars / max_request_chars, before tokenizing
    ENGINE_FAILED = "engine_failed"  # the step thread died: the process exits 1
    HOST_NOT_ALLOWED = "host_not_allowed"  # Host header outside allowed_hosts (403)
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a POST that is not JSON (415)
    CORS_REFUSED = "cors_refused"  # a refused CORS preflight
    REQUEST_TIMEOUT = "request_timeout"  # the body stopped arriving (408)
    INVALID_HTTP_REQUEST = "invalid_http_request"  # uvicorn could not parse the request


class Serves(str, Enum):
    """What a request's model runs: the proxy-tuned combination, or one of its parts alone."""

    PROXY = "proxy"  # s_base + sum_i alpha_i (s_expert_i - s_anti_i)
    BASE = "base"  # s_base alone (the same as alpha 0)
    EXPERT = "expert"  # an expert alone


@dataclass(frozen=True)
class Target:
    """Which model a request is served by: what it runs (``serves``), over every expert pair, or over the one pair
    a named pair's model id selects (``pair``, its index): that pair's expert alone, or the base steered by that
    pair alone (every other pair's alpha 0)."""

    serves: Serves
    pair: int | None = None

    PROXY: ClassVar[Target]  # every pair at its alpha
    BASE: ClassVar[Target]
    EXPERT: ClassVar[Target]  # the first pair's expert alone

    @property
    def expert_pair(self) -> int:
        """The pair whose expert an ``EXPERT`` target serves."""
        return self.pair or 0


Target.PROXY = Target(Serves.PROXY)
Target.BASE = Target(Serves.BASE)
Target.EXPERT = Target(Serves.EXPERT)


def served_targets(config: EngineConfig) -> list[Target]:
    """Every target the configuration serves: the proxy-tuned model and the base, the first pair's expert, and
    each named pair alone and its expert alone."""
    targets = [Target.PROXY, Target.BASE]
    if config.experts and config.experts[0].in_default:  # NAME:expert is the first pair's, when NAME uses it
        targets.append(Target.EXPERT)
    for index, pair in enumerate(config.experts):
        if pair.name is not None:
            targets += [Target(Serves.PROXY, index), Target(Serves.EXPERT, index)]
    return targets


class PairNotFoundError(LookupError):
    """No expert pair of that name is served (a 404, as vLLM answers for a LoRA adapter it does not hold)."""


class ContextLengthError(ValueError):
    """A prompt (plus ``max_tokens``) that does not fit the context: a 400 naming the field, as OpenAI's
    ``context_length_exceeded``."""

    code = "context_length_exceeded"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class FieldError(ValueError):
    """A request field the engine cannot honour in this request: a 400 naming it (``param``)."""

    code = None

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class NoTokenAllowedError(ValueError):
    """A row's constraints together exclude every token at this step (``allowed_token_ids`` none of which the output
    grammar allows, bad words or ``min_tokens`` banning every allowed id): the request, not the engine, is at fault."""

    def __init__(self) -> None:
        super().__init__("no token may be written next: the request's constraints together exclude every token "
                         "(allowed_token_ids, bad_words, min_tokens, logit_bias, the output grammar); loosen one")


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full or the engine is draining: the caller should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class PromptInput:
    """A prompt: completion text, chat messages, or token ids. Exactly one is set.

    Each model renders it in its own format (plain text or its chat template), so the three models' token
    sequences may differ in length.
    """

    text: str | None = None
    # Chat messages: "role" and "content" strings; an assistant's may carry OpenAI "tool_calls", a "tool"
    # message its "tool_call_id".
    messages: list[dict[str, Any]] | None = None
    token_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools the models are told about (chat only)
    # vLLM's cache_salt: mixed into the prefix cache's keys, so that only prompts with the same salt share blocks.
    cache_salt: str | None = None
    # Chat only (vLLM's names). ``continue_final``: the last message is an assistant's, left open for the models
    # to continue (a prefill of the answer), so no generation prompt follows it.
    continue_final: bool = False
    # False: no generation prompt after the messages (and no new assistant turn opened).
    generation_prompt: bool = True
    # Extra variables for the chat templates (``enable_thinking``, say); the plain transcript does not read them.
    template_kwargs: dict[str, Any] | None = None
    # vLLM's add_special_tokens: the tokenizer's special tokens (BOS) on what the client wrote, as each model
    # tokenizes it: completion text on a plain-format model (None: yes), a chat on a chat template (None: no, the
    # template writes its own). What the server builds itself (the transcript, a completion wrapped in a chat
    # template) keeps its default (PromptRenderer.render).
    add_special_tokens: bool | None = None
    # vLLM's truncate_prompt_tokens: each model's rendering cut to its last ``k`` tokens; -1 to what fits its
    # context with the room max_tokens needs (one token when max_tokens is unset). None: never truncated.
    truncate: int | None = None
    # Ids of the shared vocabulary after each model's rendering (truncated or not), as if the models had already
    # written them: how beam search (beam_search.py) asks for the next token of a beam.
    continuation: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.text, self.messages, self.token_ids)]
        if sum(given) != 1:
            raise ValueError("a prompt is exactly one of: text, messages, token ids")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            for message in self.messages:
                if not isinstance(message.get("content"), str) or not isinstance(message.get("role"), str):
                    raise ValueError("each message needs a string 'role' and a string 'content'")
        if self.token_ids is not None and not self.token_ids:
            raise ValueError("the prompt is empty")
        if self.tools and self.messages is None:
            raise ValueError("tools need a chat prompt (messages)")
        # Errors name the fields by the request's (vLLM's) names: add_generation_prompt, continue_final_message,
        # chat_template_kwargs.
        if self.messages is None and (self.continue_final or not self.generation_prompt or self.template_kwargs):
            raise ValueError("add_generation_prompt, continue_final_message and chat_template_kwargs need messages")
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES.intersection(self.template_kwargs or {}))
        if reserved:
            raise FieldError(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
        if self.continue_final:
            if self.generation_prompt:
                raise FieldError("continue_final_message and add_generation_prompt cannot both be true: the final "
                                 "message is continued, so no new assistant turn opens", "add_generation_prompt")
            final = self.messages[-1]
            if final["role"] != "assistant" or final.get("tool_calls"):
                raise FieldError("continue_final_message needs the final message to be an assistant's, without "
                                 "tool_calls", "continue_final_message")


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as one model reads it: the text it renders to (a chat template's output, say), that text's token
    ids, and where each id's text lies in it, as character offsets ``[start, stop)``. A token the tokenizer added
    (BOS) covers ``(0, 0)``, as does every token of a tokenizer that cannot say (a slow one)."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise FieldError(f"{name} must be a finite number, got {value}", name.split()[0])


def checked_logprobs(value: int, max_logprobs: int, vocab_size: int, name: str) -> int:
    """A request's count of alternatives per token (``name``), checked against the server's ``max_logprobs``; -1,
    the whole vocabulary, where that is -1 too (vLLM's rule), becomes ``vocab_size``."""
    if max_logprobs == -1:
        if value == -1:
            return vocab_size
        if 0 <= value <= vocab_size:
            return value
        raise FieldError(f"{name} must be -1 (the whole vocabulary) or between 0 and {vocab_size}, got {value}", name)
    if not 0 <= value <= max_logprobs:
        whole = " (-1, the whole vocabulary, needs the server's --max-logprobs -1)" if value == -1 else ""
        raise FieldError(f"{name} must be between 0 and {max_logprobs}, got {value}{whole}", name)
    return value


@dataclass(frozen=True)
class ThinkingTags:
    """Where a reasoning model's thinking block opens and closes, as its reasoning parser reads it (the server fills
    it in): the spellings of the opening and closing tags, and whether the template opens the block in the prompt.
    The first closing spelling is the one a thinking budget forces."""

    opens: tuple[str, ...]
    closes: tuple[str, ...]
    opened: bool = False


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI's plus the common vLLM extensions, plus ``alpha``)."""

    max_tokens: int | None = None  # None: up to the context left (or default_max_tokens, if fewer)
    # The model's recommended length (generation_config.json max_new_tokens) for a request that set none: a cap,
    # never a refusal (the client did not ask for it).
    default_max_tokens: int | None = None
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    typical_p: float = 1.0  # locally typical sampling's mass (TGI's); 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    # vLLM's: only these tokens may be generated (None: any); words the output must not contain (bad_words.py).
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    seed: int | None = None
    n: int = 1
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token plus the top k
    # The same for every prompt token after the first (the combined distribution's, as for generated tokens):
    # what ``echo`` with ``logprobs`` returns, and what evaluation harnesses score prompts with.
    prompt_logprobs: int | None = None
    # Per generated token, each model's own distribution (base, every expert and anti-expert) and the combined
    # one: the chosen token's logprob and the top k of each (analysis.py). Every model then runs for the
    # sequence, even one whose weight is 0 (alpha 0), so that its distribution can be shown.
    model_logprobs: int | None = None
    # vLLM's return_token_ids: the request's stream carries each prompt's token ids (the base model's rendering,
    # what usage counts) as soon as it is admitted.
    return_prompt_ids: bool = False
    skip_special_tokens: bool = True
    # vLLM's: under the priority scheduling policy, waiting requests are admitted lowest priority first (then by
    # arrival). Not a sampling knob, but carried with the request's other parameters to the scheduler.
    priority: int = 0
    # None: the configured default of every pair; a number: that alpha for every pair; a list: one per pair.
    alpha: float | list[float] | None = None
    # A constraint on the output (JSON schema, regex, choice, grammar), applied to the combined logits.
    structured: StructuredOutput | None = None
    # vLLM's: at most this many tokens inside the thinking block, then its closing tag is forced
    # (thinking_budget.py); the tags say where the block is.
    thinking_token_budget: int | None = None
    thinking_tags: ThinkingTags | None = None
    # vLLM's use_beam_search: the n likeliest continuations under the combined distribution, found n beams wide
    # (beam_search.py), ranked by their logprob over their length ** length_penalty.
    beam_search: bool = False
    length_penalty: float = 1.0
    # Per choice index, the tokens that choice writes, whatever the sampler would draw (its logprobs are still the
    # combined distribution's): beam search's answers, read out as any generation is (text, stops, logprobs).
    replay: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_n(self) -> None:
        """``n`` in range: checked before anything is sized by it (a request's stream holds a set of its choices)."""
        if isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise FieldError(f"n must be between 1 and {MAX_N}, got {self.n}", "n")

    def validate(self, vocab_size: int, num_pairs: int, max_logprobs: int = MAX_LOGPROBS,
                 pair: int | None = None, members: list[int] | None = None) -> None:
        """Raise ``ValueError`` with a message fit for a 400 if any value is out of range (``pair``: the one expert
        pair the request's model serves, if a named pair's; ``members``: the pairs of the default combination, by
        default all)."""
        for name in ("temperature", "top_p", "min_p", "typical_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            _finite(name, float(getattr(self, name)))
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise FieldError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}", "temperature")
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0  # greedy: see MIN_TEMPERATURE
        if not 0.0 < self.top_p <= 1.0:
            raise FieldError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not -1 <= self.top_k < 2**63:
            raise FieldError(f"top_k must be -1, 0 (off) or a positive count of tokens, got {self.top_k}", "top_k")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise FieldError(f"seed must fit in 64 bits, got {self.seed}", "seed")
        if not 0.0 <= self.min_p <= 1.0:
            raise FieldError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not 0.0 < self.typical_p <= 1.0:
            raise FieldError(f"typical_p must be in (0, 1], got {self.typical_p}", "typical_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise FieldError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise FieldError(f"repetition_penalty must be in [{low:g}, {high:g}], got {self.repetition_penalty}",
                             "repetition_penalty")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise FieldError(f"max_tokens must be at least 0, got {self.max_tokens}", "max_tokens")
        if self.thinking_token_budget is not None:
            if isinstance(self.thinking_token_budget, bool) or not 0 <= self.thinking_token_budget < 2**31:
                raise FieldError(f"thinking_token_budget must be a count of tokens, 0 or more, got "
                                 f"{self.thinking_token_budget}", "thinking_token_budget")
            if self.structured is not None:
                raise FieldError("thinking_token_budget cannot be combined with an output constraint: the grammar "
                                 "leaves no room to think", "thinking_token_budget")
            if self.thinking_tags is None or not self.thinking_tags.closes:
                raise FieldError("thinking_token_budget needs to know where thinking ends: serve the model with a "
                                 "reasoning parser (--reasoning-parser)", "thinking_token_budget")
        if self.min_tokens < 0:
            raise FieldError(f"min_tokens must be >= 0, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise FieldError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                             "min_tokens")
        self.check_n()
        for name in ("logprobs", "prompt_logprobs", "model_logprobs"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, checked_logprobs(value, max_logprobs, vocab_size, name))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise FieldError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}", "stop")
        for stop in self.stop:
            if not isinstance(stop, str):
                raise FieldError(f"stop must be a string or a list of strings, got {type(stop).__name__}", "stop")
            if len(stop) > MAX_STOP_STRING_CHARS:
                raise FieldError(f"a stop string may be at most {MAX_STOP_STRING_CHARS} characters", "stop")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise FieldError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
                             "stop_token_ids")
        if len(self.logit_bias or {}) > MAX_LOGIT_BIAS:
            raise FieldError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias or {})}",
                             "logit_bias")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise FieldError(f"stop_token_ids: {token_id} is outside the vocabulary [0, {vocab_size})",
                                 "stop_token_ids")
        for token_id, bias in (self.logit_bias or {}).items():
            if not 0 <= int(token_id) < vocab_size:
                raise FieldError(f"logit_bias: token id {token_id} is outside the vocabulary [0, {vocab_size})",
                                 "logit_bias")
            _finite("logit_bias value", float(bias))
            if not -100.0 <= float(bias) <= 100.0:
                raise FieldError(f"logit_bias values must be in [-100, 100], got {bias}", "logit_bias")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise FieldError("allowed_token_ids must not be empty (leave it out to allow every token)",
                                 "allowed_token_ids")
            if len(self.allowed_token_ids) > vocab_size:
                raise FieldError(f"allowed_token_ids lists {len(self.allowed_token_ids)} ids; the vocabulary has "
                                 f"{vocab_size}", "allowed_token_ids")
            if any(not 0 <= token_id < vocab_size for token_id in self.allowed_token_ids):
                raise FieldError(f"allowed_token_ids must be in [0, {vocab_size})", "allowed_token_ids")
        if self.bad_words is not None:
            if len(self.bad_words) > MAX_BAD_WORDS:
                raise FieldError(f"at most {MAX_BAD_WORDS} bad_words, got {len(self.bad_words)}", "bad_words")
            for word in self.bad_words:
                if not isinstance(word, str) or not word.strip() or len(word) > MAX_STOP_STRING_CHARS:
                    raise FieldError(f"each of bad_words must be a word of 1 to {MAX_STOP_STRING_CHARS} characters",
                                     "bad_words")
        self.resolve_alphas([0.0] * num_pairs, pair, members)
        if self.structured is not None:
            self.structured.validate()
        if self.beam_search:
            self.check_beam_search()
        if self.replay is not None and any(not 0 <= t < vocab_size for tokens in self.replay for t in tokens):
            raise FieldError(f"replayed token ids must be in [0, {vocab_size})", "replay")

    def check_beam_search(self) -> None:
        """Beam search ranks continuations by the combined distribution itself: what reshapes the distribution
        before a draw (biases, bans, penalties, a constraint, a forced thinking end) has no place in it, and is a
        400 naming it rather than an answer that ignores it."""
        self.check_n()  # the beam's width: checked before a search is sized by it
        _finite("length_penalty", float(self.length_penalty))
        if not -10.0 <= self.length_penalty <= 10.0:
            raise FieldError(f"length_penalty must be in [-10, 10], got {self.length_penalty}", "length_penalty")
        reshaping = {
            "logit_bias": bool(self.logit_bias), "allowed_token_ids": self.allowed_token_ids is not None,
            "bad_words": bool(self.bad_words), "min_tokens": self.min_tokens > 0,
            "presence_penalty": self.presence_penalty != 0.0, "frequency_penalty": self.frequency_penalty != 0.0,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "response_format": self.structured is not None,
            "thinking_token_budget": self.thinking_token_budget is not None,
        }
        for name, set_ in reshaping.items():
            if set_:
                raise FieldError(f"{name} cannot be combined with use_beam_search: beam search ranks continuations "
                                 "by the model's own distribution", name)

    def resolve_alphas(self, defaults: list[float], pair: int | None = None,
                       members: list[int] | None = None) -> list[float]:
        """The alpha of every expert pair for this request (``defaults``: each pair's configured alpha).

        Without ``pair`` the request is the default combination: the pairs in ``members`` (by default all; a pair
        with ``in_default: false`` is not one) at their alphas, every other pair at 0. There ``alpha`` is one number
        for every member, or a list of one per member. With ``pair`` (a named pair's model id), that pair's alpha
        alone and 0 for every other: one number, a list of one, or a list of one per member (the pair's own
        value counts)."""
        members = list(range(len(defaults))) if members is None else members
        given = self.alpha if isinstance(self.alpha, list) else [self.alpha]
        chosen = [0.0] * len(defaults)
        if pair is not None:
            if len(given) == 1:
                value = given[0]
            elif len(given) == len(members) and pair in members:
                value = given[members.index(pair)]
            else:
                raise FieldError(f"alpha has {len(given)} values, but this model serves one expert pair: give one "
                                 "number", "alpha")
            chosen[pair] = defaults[pair] if value is None else value
            return _checked_alphas(chosen)
        if self.alpha is None:
            given = [defaults[index] for index in members]
        elif not isinstance(self.alpha, list):
            given = [float(self.alpha)] * len(members)
        if len(given) != len(members):
            raise FieldError(f"alpha has {len(given)} values but the engine combines {len(members)} expert pairs",
                             "alpha")
        for index, value in zip(members, given):
            chosen[index] = value
        return _checked_alphas(chosen)


def _checked_alphas(alphas: list[float]) -> list[float]:
    for value in alphas:
        _finite("alpha", float(value))
        if abs(float(value)) > 100:
            raise FieldError(f"alpha must be in [-100, 100], got {value}", "alpha")
    return [float(a) for a in alphas]


@dataclass
class TopLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: list[int] = field(default_factory=list)  # the token's raw UTF-8 bytes (may be part of a character)


@dataclass
class TokenLogprob:
    """The combined distribution's log-probability of one token (generated, or of the prompt), and its top
    alternatives."""

    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token: nothing predicts it
    top: list[TopLogprob] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)  # the token's raw UTF-8 bytes (may be part of a character)
    rank: int | None = None  # prompt tokens: 1 + how many tokens the distribution rates strictly higher


@dataclass
class ModelLogprobs:
    """One distribution at one generated position: a model's own (``role`` is its role: ``base``, ``expert``,
    ``anti_expert``, ``expert_1``...) or the combined one the token was drawn from (``proxy``)."""

    role: str
    logprob: float  # the chosen token's
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class TokenAnalysis:
    """What every model thought of one generated token (``SamplingParams.model_logprobs``)."""

    token_id: int
    token: str  # the text the token added to the completion (as a ``TokenLogprob``'s)
    shift: float  # the proxy's logprob of the token minus the base's: how far the tuning moved it
    models: list[ModelLogprobs] = field(default_factory=list)  # the base, each expert and anti-expert, the proxy


@dataclass(frozen=True)
class RequestTimings:
    """Where a finished sequence's time went, in seconds, as vLLM's per-request histograms split it: ``queued``
    from its arrival at the engine to its first prefill, ``prefill`` from then to its first token, ``decode`` from
    its first token to its last (0 without tokens)."""

    queued_s: float
    prefill_s: float
    decode_s: float

    @property
    def inference_s(self) -> float:
        """From its first prefill to its end: prefill and decode (vLLM's inference time)."""
        return self.prefill_s + self.decode_s


@dataclass(kw_only=True)
class RequestOutput:
    """One step's news for one sequence (choice ``index``) of a request."""

    request_id: str
    index: int
    new_token_ids: list[int]
    text_delta: str
    finish_reason: FinishReason | None = None
    # vLLM's ``stop_reason``, with finish_reason STOP: the stop string or the ``stop_token_ids`` id that ended the
    # sequence; None when an end-of-sequence token did (or it did not stop).
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0  # the base model's prompt length
    completion_tokens: int = 0  # cumulative for this sequence
    error: str | None = None  # set when finish_reason is ERROR
    error_code: ErrorCode | None = None  # with ERROR: TIMEOUT (the request's time limit) or INTERNAL_ERROR
    # On a sequence's first output when ``prompt_logprobs`` was asked: one entry per prompt token (the first
    # with logprob None).
    prompt_logprobs: list[TokenLogprob] | None = None
    model_logprobs: list[TokenAnalysis] | None = None  # one per new token, when asked for
    # On a prompt's first choice's first output: how many of its prompt tokens (in the model that reports usage)
    # were read from the prefix cache instead of computed (OpenAI's usage.prompt_tokens_details.cached_tokens).
    cached_tokens: int | None = None
    timings: RequestTimings | None = None  # on a sequence's last output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def failure(
        cls, request_id: str, index: int, error: str, code: ErrorCode = ErrorCode.INTERNAL_ERROR, *,
        prompt_tokens: int = 0, completion_tokens: int = 0,
    ) -> RequestOutput:
        """Choice ``index``'s last output when it ends in error (no token, no text)."""
        return cls(
            request_id=request_id, index=index, new_token_ids=[], text_delta="", finish_reason=FinishReason.ERROR,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, error=error, error_code=code,
        )
