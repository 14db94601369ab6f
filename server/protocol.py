"""The OpenAI wire format: request models (lenient: unknown fields are ignored) and response builders.

Requests validate into pydantic models, then convert into the engine's ``PromptInput`` and ``SamplingParams``;
range checks on sampling values are the engine's (``SamplingParams.validate``), so there is one rule per value.
Responses are plain dicts built here, so that ``null`` and absent fields are exactly what clients expect.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from proxy_engine.async_engine import ModelInfo
from proxy_engine.request import (
    MAX_LOGPROBS,
    PromptInput,
    SamplingParams,
    ThinkingTags,
    TokenAnalysis,
    TokenLogprob,
    TopLogprob,
)
from server import structured as structured_fields
from server import tools as tool_fields
from server.errors import bad_request
from server.guards import clip
from server.reasoning import OPENED_IN_PROMPT, SPECIAL_TAG_PARSERS, TAGS, ReasoningParser, thinking_disabled

# The logprob sent in place of -inf (JSON has no infinities).
MIN_LOGPROB = -9999.0
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
TEXT_PART_TYPES = {"text", "input_text"}
TOP_P_ZERO = 1e-9
MAX_PROMPTS = 64  # prompts in one completions request (each with its n choices)
MAX_MESSAGES = 2048  # messages in one chat request (a long agent transcript has hundreds)

# Text fields that are neither prompt nor constraint, bounded so that no field escapes a limit (docs/reliability.md).
MAX_USER_CHARS = 512  # `user` (OpenAI: an end-user id)
MAX_CACHE_SALT_CHARS = 256  # `cache_salt` (vLLM's): any secret works, a long one buys nothing

# Integers that end up in tensors or seed a generator must fit in 64 bits: a bigger one is a 400 naming the
# field, not an overflow deep in the engine. (Range rules proper stay the engine's.)
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


def check_text(value: str, param: str) -> str:
    """Refuse text that is not valid Unicode (JSON lets a lone UTF-16 surrogate through as ``\\ud800``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = value[error.start]
        raise bad_request(
            f"{param} is not valid Unicode: it holds a lone surrogate (U+{ord(bad):04X}) at character {error.start}",
            param,
        ) from None
    return value


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def asks_nothing(value: Any) -> bool:
    """A value that asks for nothing beyond the default: absent, null, false, zero or empty."""
    return value is None or value is False or (isinstance(value, int) and value == 0) or value in ("", [], {})


@dataclass(frozen=True)
class Unhonoured:
    """A request field that would change what the client gets back, and that this server does not do.

    Unknown sampler hints are ignored (frontends send many), but dropping one of these would answer a different
    request than the one sent (audio, a web search, beam search, moderation that blocks): a value ``accepts``
    refuses is a 400 naming the field.
    """

    why: str
    accepts: Callable[[Any], bool] = asks_nothing


def refuse_unhonoured(request: BaseModel, rules: Mapping[str, Unhonoured]) -> None:
    """400 for the first field of ``rules`` whose value ``request`` sets and this server would not honour."""
    for name, rule in rules.items():
        if not rule.accepts(getattr(request, name)):
            raise bad_request(f"{name} is not supported: {rule.why}", name)


def _null(value: Any) -> bool:
    """For a field whose mere presence asks for something (``web_search_options: {}`` searches with defaults)."""
    return value is None


def _text_only(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(kind == "text" for kind in value))


# vLLM's extensions that change the output, on both endpoints; the ones honoured are fields of _SamplingFields.
_UNHONOURED_SAMPLING = {
    "logits_processors": Unhonoured("logits processors cannot be loaded from a request"),
}


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's: with include_usage, the counts so far in every chunk


class _SamplingFields(_Lenient):
    """Fields both endpoints accept. ``None`` always means "the default"."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    # vLLM's: mixed into the prefix cache's block keys, so only requests with the same salt share cached prompts.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    # Proxy-tuning: the strength of every expert pair (a number for all, or one per pair); 0 is the base alone.
    alpha: float | list[float] | None = None
    # Proxy-tuning analysis: per generated token, every model's top-k logprobs and the proxy's (docs/playground.md).
    model_logprobs: int | None = None
    # vLLM's: each choice's generated ids (``token_ids``) and its prompt's (``prompt_token_ids``: the base model's
    # rendering), and logprob tokens named ``token_id:<id>`` instead of by their text.
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: each model's prompt cut to its last k tokens (-1: to what fits beside max_tokens).
    truncate_prompt_tokens: Int64 | None = None
    # Common extensions (vLLM's names).
    top_k: Int64 | None = None
    min_p: float | None = None
    typical_p: float | None = None  # TGI's and llama.cpp's: locally typical sampling
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # Output constraints (server/structured.py): OpenAI's, and vLLM's two spellings.
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    # vLLM's beam search: the n likeliest continuations (proxy_engine/beam_search.py), ranked by their logprob over
    # their length ** length_penalty.
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    # Refused when set (UNHONOURED); declared so that it is read, not dropped with the unknown fields.
    logits_processors: Any = None
    # vLLM's: every prompt token's logprob, its rank and the top k, in the answer (not in a stream).
    prompt_logprobs: int | None = None
    # vLLM's: admission order under --scheduling-policy priority (lower first); otherwise only 0 is accepted.
    priority: Int64 | None = None

    UNHONOURED: ClassVar[dict[str, Unhonoured]] = _UNHONOURED_SAMPLING

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def _truncate(self) -> int | None:
        """``truncate_prompt_tokens`` checked: -1 (to what fits) or a count of at least 1."""
        keep = self.truncate_prompt_tokens
        if keep is not None and keep < 1 and keep != -1:
            raise bad_request(f"truncate_prompt_tokens must be -1 (to what fits) or at least 1, got {keep}",
                              "truncate_prompt_tokens")
        return keep

    def _prompt_logprobs(self) -> int | None:
        """``prompt_logprobs``, as in vLLM not with ``stream`` (the answer carries them whole); its range is the
        engine's to check (``request.checked_logprobs``: 0 to the server's max_logprobs)."""
        k = self.prompt_logprobs
        if k is not None and self.stream:
            raise bad_request("prompt_logprobs are not available when stream is true", "prompt_logprobs")
        return k

    def _max_tokens(self, *, zero_ok: bool, note: str = "") -> int | None:
        """``max_completion_tokens`` (it wins) or ``max_tokens``; below 1 is a 400, except 0 when ``zero_ok``."""
        field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        value = getattr(self, field)
        if value is not None and value < 1 and not (zero_ok and value == 0):
            raise bad_request(f"{field} must be at least 1{note}, got {value}", field)
        return value

    def structured(self):
        """The request's one output constraint, or None (two are a 400)."""
        guided = {name: getattr(self, name) for name in ("guided_json", "guided_regex", "guided_choice",
                                                         "guided_grammar")}
        return structured_fields.resolve(self.response_format, self.structured_outputs, guided)

    def _sampling(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None, structured=None,
        defaults: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """The engine's parameters: the request's fields, then ``defaults`` (the model's generation_config) for
        the sampler fields it left out; its ``max_tokens`` there is a cap for a request that sent none."""
        refuse_unhonoured(self, self.UNHONOURED)
        if self.use_beam_search:
            # The model's sampler defaults (a generation_config's repetition_penalty, say) reshape a distribution
            # that beam search ranks as it is: only its length applies. What the request itself sets is checked.
            defaults = {k: v for k, v in (defaults or {}).items() if k == "max_tokens"}
        values: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            # OpenAI reads top_p 0 as "the most likely token only" (LibreChat's slider reaches 0); the engine
            # needs top_p > 0, and any tiny one keeps exactly that token.
            "top_p": TOP_P_ZERO if self.top_p == 0 else self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "typical_p": self.typical_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "n": self.n,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "stop": _stops(self.stop),
            "stop_token_ids": self.stop_token_ids,
            "allowed_token_ids": self.allowed_token_ids,
            "bad_words": self.bad_words,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "priority": self.priority,
            "alpha": self.alpha,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "model_logprobs": self.model_logprobs,
            "return_prompt_ids": True if self.return_token_ids else None,
            "logit_bias": _logit_bias(self.logit_bias),
            "structured": structured if structured is not None else self.structured(),
            "beam_search": self.use_beam_search,
            "length_penalty": self.length_penalty,
        }
        params = with_defaults(values, defaults)
        if params.top_k == -1:
            params.top_k = 0
        return params


def with_defaults(values: dict[str, Any], defaults: dict[str, Any] | None) -> SamplingParams:
    """The engine's parameters from a request's ``values`` (None: left out), every endpoint's way: ``defaults``
    (the model's generation_config) fill the fields it left out, and their ``max_tokens`` caps a request that
    sent none (never a refusal: the client did not ask for it)."""
    defaults = dict(defaults or {})
    default_max_tokens = defaults.pop("max_tokens", None)
    if values.get("max_tokens") is None:
        values["default_max_tokens"] = default_max_tokens
    for name, value in defaults.items():
        if values.get(name) is None:
            values[name] = value
    return SamplingParams(**{k: v for k, v in values.items() if v is not None or k == "max_tokens"})


def _stops(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    return [check_text(text, "stop") for text in stops]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    converted: dict[int, float] = {}
    for key, value in bias.items():
        try:
            converted[int(key)] = float(value)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {clip(key, 40)!r}", "logit_bias") from None
    return converted


class CompletionRequest(_SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids (checked below, so
    # that a wrong shape gets one clear message instead of one per union member).
    prompt: Any
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: Int64 | None = None
    # vLLM's: the tokenizer's special tokens (BOS) on the prompt text as plain models tokenize it (default yes;
    # false for a text that already starts with them).
    add_special_tokens: bool | None = None
    thinking_token_budget: Any = None  # refused (UNHONOURED): a completion's thinking is not read

    UNHONOURED: ClassVar[dict[str, Unhonoured]] = {
        **_UNHONOURED_SAMPLING,
        "thinking_token_budget": Unhonoured("a thinking budget applies to chat requests, whose thinking the "
                                            "reasoning parser reads (--reasoning-parser)", _null),
    }

    def prompt_input(self) -> PromptInput | list[PromptInput]:
        """One prompt, or several: prompt ``i``'s choices are then numbered from ``i * n``, as OpenAI does."""
        prompt = self.prompt
        truncate = self._truncate()
        if truncate is not None and self.echo:
            raise bad_request("truncate_prompt_tokens cannot be combined with echo: the echoed prompt would not be "
                              "the one the models read", "truncate_prompt_tokens")
        if isinstance(prompt, str):
            return PromptInput(text=check_text(prompt, "prompt"), add_special_tokens=self.add_special_tokens,
                               truncate=truncate)
        if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
            return PromptInput(token_ids=list(prompt), truncate=truncate)
        if isinstance(prompt, list) and not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if not isinstance(prompt, list) or not all(isinstance(p, (str, list)) for p in prompt):
            raise bad_request(
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
                "prompt",
            )
        if len(prompt) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}", "prompt")
        prompts = []
        for i, one in enumerate(prompt):
            if isinstance(one, str):
                prompts.append(PromptInput(text=check_text(one, f"prompt[{i}]"),
                                           add_special_tokens=self.add_special_tokens, truncate=truncate))
            elif one and all(_is_token_id(t) for t in one):
                prompts.append(PromptInput(token_ids=list(one), truncate=truncate))
            else:
                raise bad_request(f"prompt[{i}] must be a string or a non-empty list of token ids", "prompt")
        return prompts[0] if len(prompts) == 1 else prompts

    @property
    def wants_prompt_logprobs(self) -> bool:
        """``echo`` with ``logprobs``: every prompt token's logprob too (how harnesses score a prompt, usually
        with ``max_tokens`` 0 or 1)."""
        return bool(self.echo) and self.logprobs is not None

    def sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        # best_of up to n asks for nothing more (LangChain sends best_of 1 whatever n is); more would mean
        # generating best_of choices and returning the n likeliest, which this server does not do (nor vLLM's V1).
        if self.best_of is not None and self.best_of > (self.n or 1):
            raise bad_request(f"best_of > n is not supported (best_of {self.best_of}, n {self.n or 1}): send n "
                              "alone", "best_of")
        max_tokens = self._max_tokens(zero_ok=bool(self.echo), note=" (0 only with echo: the prompt alone)")
        # echo's and vLLM's prompt logprobs come from one scoring pass, with the larger top k
        wanted = [k for k in (self.logprobs if self.wants_prompt_logprobs else None, self._prompt_logprobs())
                  if k is not None]
        prompt_logprobs = max(wanted) if wanted else None
        structured = self.structured()
        if structured is not None and max_tokens == 0:
            raise bad_request("an output constraint needs max_tokens of at least 1", "max_tokens")
        return self._sampling(max_tokens, self.logprobs, prompt_logprobs, structured, defaults)


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None


class ChatPromptControls(_Lenient):
    """vLLM's prompt controls, on chat and on /tokenize with messages: continue the final assistant message (a
    prefill of the answer), no generation prompt, and extra variables for the chat templates
    (``enable_thinking``, say)."""

    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # The tokenizer's special tokens on top of a chat template's rendering (vLLM's; default no). On a completion
    # (and /tokenize with a prompt), on the text as plain models tokenize it (default yes).
    add_special_tokens: bool | None = None

    def template_controls(self) -> dict[str, Any]:
        """``PromptInput``'s continue_final / generation_prompt / template_kwargs / add_special_tokens: a
        continued final message opens no new assistant turn unless add_generation_prompt says otherwise (which
        the engine refuses)."""
        continue_final = bool(self.continue_final_message)
        generation_prompt = not continue_final if self.add_generation_prompt is None else self.add_generation_prompt
        return {"continue_final": continue_final, "generation_prompt": generation_prompt,
                "template_kwargs": self.template_variables() or None, "add_special_tokens": self.add_special_tokens}

    def template_variables(self) -> dict[str, Any]:
        """The extra variables every chat template renders with: the request's ``chat_template_kwargs``."""
        return dict(self.chat_template_kwargs or {})


# OpenAI's reasoning_effort values, and vLLM's max.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def effort_variables(effort: Any, param: str = "reasoning_effort") -> dict[str, Any]:
    """``reasoning_effort`` as chat-template variables, as vLLM passes it: the value itself (gpt-oss' and Qwen's
    templates branch on it) and ``enable_thinking`` (off for ``none``: Qwen3's and Gemma's switch). A value outside
    OpenAI's set is a 400 naming ``param``."""
    if effort is None:
        return {}
    if effort not in REASONING_EFFORTS:
        raise bad_request(f"{param} must be one of {', '.join(REASONING_EFFORTS)}, got {clip(str(effort), 40)!r}",
                          param)
    return {"reasoning_effort": effort, "enable_thinking": effort != "none"}


class ChatCompletionRequest(_SamplingFields, ChatPromptControls):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # Refused when given (vLLM accepts it): a template from the request could read files through Jinja's
    # loaders or change how every model sees the prompt. Each model renders with its configured template.
    chat_template: Any = None
    # Tool calls (server/tools.py).
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: Any = None  # the deprecated spelling: refused with a pointer to tools
    function_call: Any = None
    # vLLM's: the last message, when it is the assistant's (continue_final_message), goes before the answer.
    echo: bool | None = False
    # Refused when set (UNHONOURED): OpenAI's output kinds and services this server does not have.
    modalities: Any = None
    audio: Any = None
    web_search_options: Any = None
    moderation: Any = None
    documents: Any = None
    # vLLM's: false leaves reasoning_content out of the answer (with a reasoning parser; server/reasoning.py).
    include_reasoning: bool = True
    # vLLM's: at most this many tokens of thinking, then the parser's closing tag is forced and the model answers.
    thinking_token_budget: int | None = None
    # OpenAI's: passed to the chat templates (effort_variables); chat_template_kwargs given too win.
    reasoning_effort: Any = None

    UNHONOURED: ClassVar[dict[str, Unhonoured]] = {
        **_UNHONOURED_SAMPLING,
        "modalities": Unhonoured("only text output", _text_only),
        "audio": Unhonoured("no audio output (text only)"),
        "web_search_options": Unhonoured("no web search: the models answer from the prompt alone", _null),
        "moderation": Unhonoured("no moderation model runs on this server"),
        "documents": Unhonoured("documents are not rendered into the prompt; put them in a message"),
    }

    def tool_plan(self, fmt: str | None = "hermes") -> tool_fields.ToolPlan:
        """What the request's tools mean (validated once: a bad tool or tool_choice is a 400)."""
        for legacy in ("functions", "function_call"):
            if getattr(self, legacy) is not None:
                raise bad_request(f"{legacy} (deprecated) is not supported: send tools and tool_choice", legacy)
        cached = self.__dict__.get("_plan")
        if cached is None:
            cached = tool_fields.plan(tool_fields.check_tools(self.tools), self.tool_choice, self.parallel_tool_calls,
                                      fmt)
            self.__dict__["_plan"] = cached
        return cached

    def template_variables(self) -> dict[str, Any]:
        """The request's ``reasoning_effort`` as template variables, under its ``chat_template_kwargs``."""
        return {**effort_variables(self.reasoning_effort), **(self.chat_template_kwargs or {})}

    def echoed(self) -> str:
        """vLLM's chat ``echo``: the text each choice's content starts with, the last message's when it is the
        assistant's (a continued answer comes back whole); empty otherwise, as vLLM echoes only the answer's role."""
        last = self.messages[-1]
        if not self.echo or CHAT_ROLES.get(last.role) != "assistant":
            return ""
        return _content_text(last.content, len(self.messages) - 1) or ""

    def reasoning_parser(self, configured: ReasoningParser | None, fmt: str | None = "hermes"
                         ) -> ReasoningParser | None:
        """The reasoning parser of this request's answer: the server's, unless the request turned thinking off
        through its template variables or constrains the output (a grammar leaves no room to think). Decided once
        per request (its sampling parameters and its answer's parsing both ask)."""
        asked, decided = self.__dict__.get("_reasoning", ((), None))
        if asked != (configured, fmt):
            off = configured is None or thinking_disabled(self.template_variables()) or self.structured() is not None \
                or self.tool_plan(fmt).mode in ("named", "required")
            decided = None if off else configured
            self.__dict__["_reasoning"] = ((configured, fmt), decided)
        return decided

    def prompt_input(self, fmt: str | None = "hermes") -> PromptInput:
        if self.chat_template is not None:
            raise bad_request(
                "chat_template is not accepted in requests: each model renders chat with the template its "
                "operator configured (engine.*.chat_template)",
                "chat_template",
            )
        if len(self.messages) > MAX_MESSAGES:
            raise bad_request(f"at most {MAX_MESSAGES} messages in one request, got {len(self.messages)}", "messages")
        messages = []
        for i, message in enumerate(self.messages):
            role = CHAT_ROLES.get(message.role)
            if role is None:
                raise bad_request(
                    f"messages[{i}].role {message.role!r} is not supported (use system, developer, user, assistant or "
                    "tool)",
                    f"messages[{i}].role",
                )
            messages.append(_chat_message(role, message, i))
        check_tool_results(messages)
        plan = self.tool_plan(fmt)
        return PromptInput(messages=messages, tools=plan.tools or None, truncate=self._truncate(),
                           **self.template_controls())

    def sampling_params(self, fmt: str | None = "hermes", defaults: dict[str, Any] | None = None,
                        max_logprobs: int = MAX_LOGPROBS, reasoning: ReasoningParser | None = None) -> SamplingParams:
        """``max_logprobs``: the server's cap (-1: the whole vocabulary), checked here for ``top_logprobs`` so that
        the 400 names chat's field (the engine's check would say "logprobs"). ``reasoning``: the server's parser."""
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if self.top_logprobs is not None:
            whole = max_logprobs == -1 and self.top_logprobs == -1
            if not whole and not (0 <= self.top_logprobs and (max_logprobs == -1 or self.top_logprobs <= max_logprobs)):
                bound = "-1 (the whole vocabulary) or at least 0" if max_logprobs == -1 else \
                    f"between 0 and {max_logprobs}"
                raise bad_request(f"top_logprobs must be {bound}, got {self.top_logprobs}", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        structured = self.structured()
        plan = self.tool_plan(fmt)
        if plan.mode != "text" and structured is not None:
            raise bad_request("response_format (or another output constraint) cannot be combined with tools unless "
                              "tool_choice is 'none'", "response_format")
        structured = plan.constraint or structured
        params = self._sampling(self._max_tokens(zero_ok=False), logprobs, self._prompt_logprobs(), structured,
                                defaults)
        # A call's marker or a thinking tag may be a special token (Mistral's [TOOL_CALLS], [THINK]): kept for the
        # parsers, unless the client said otherwise.
        parser = self.reasoning_parser(reasoning, fmt)
        if (plan.keeps_special_tokens or parser in SPECIAL_TAG_PARSERS) and self.skip_special_tokens is None:
            params.skip_special_tokens = False
        if self.thinking_token_budget is not None:
            if reasoning is None:
                raise bad_request("thinking_token_budget needs the server's reasoning parser (--reasoning-parser), "
                                  "which says where thinking starts and ends", "thinking_token_budget")
            if parser is not None:  # else this answer has no thinking (turned off, or constrained): nothing to cap
                opens, closes = TAGS[parser]
                params.thinking_token_budget = self.thinking_token_budget
                params.thinking_tags = ThinkingTags(opens, closes, opened=parser in OPENED_IN_PROMPT)
        return params


def _chat_message(role: str, message: ChatMessage, i: int) -> dict[str, Any]:
    """One message for the engine: an assistant's ``tool_calls`` checked and kept, a tool result's id required."""
    out: dict[str, Any] = {"role": role, "content": _content_text(message.content, i)}
    if message.tool_calls:
        if role != "assistant":
            raise bad_request(f"messages[{i}]: only assistant messages carry tool_calls", f"messages[{i}].tool_calls")
        calls = []
        for j, call in enumerate(message.tool_calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise bad_request(f"messages[{i}].tool_calls[{j}] needs function.name", f"messages[{i}].tool_calls")
            arguments = function.get("arguments", "{}")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            calls.append({"id": str(call.get("id") or ""), "type": "function",
                          "function": {"name": function["name"], "arguments": arguments}})
        out["tool_calls"] = calls
    if role == "tool":
        if not message.tool_call_id:
            raise bad_request(f"messages[{i}] (role tool) needs tool_call_id", f"messages[{i}].tool_call_id")
        out["tool_call_id"] = message.tool_call_id
    if message.name and role in ("tool", "user"):
        out["name"] = message.name
    return out


def check_tool_results(messages: list[dict[str, Any]]) -> None:
    """A ``tool`` message answers a call an earlier assistant message made (OpenAI refuses it otherwise)."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        called.update(call["id"] for call in message.get("tool_calls") or [])
        if message["role"] == "tool" and message["tool_call_id"] not in called:
            raise bad_request(f"messages[{i}].tool_call_id {clip(message['tool_call_id'], 80)!r} answers no tool call "
                              "of an earlier assistant message", f"messages[{i}].tool_call_id")


def _content_text(content: str | list[dict[str, Any]] | None, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return check_text(content, f"messages[{i}].content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise bad_request(
                f"messages[{i}].content[{j}] has type {kind!r}: only text parts "
                '({"type": "text", "text": ...}) are supported',
                f"messages[{i}].content[{j}].type",
            )
        texts.append(check_text(part["text"], f"messages[{i}].content[{j}].text"))
    return "\n".join(texts)


class TokenizeRequest(ChatPromptControls):
    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    return_token_strs: bool | None = False  # vLLM's: each token's vocabulary piece too (``token_strs``)

    def prompt_input(self) -> PromptInput:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if self.messages is not None:
            if not self.messages:
                raise bad_request("messages must not be empty", "messages")
            controls = {name: getattr(self, name) for name in ChatPromptControls.model_fields}
            return ChatCompletionRequest(messages=self.messages, **controls).prompt_input()
        if isinstance(self.prompt, str):
            return PromptInput(text=check_text(self.prompt, "prompt"), add_special_tokens=self.add_special_tokens)
        return PromptInput(token_ids=list(self.prompt or []))


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]

    def check(self, info: ModelInfo) -> None:
        for token_id in self.tokens:
            if not 0 <= token_id < info.vocab_size:
                raise bad_request(f"token id {token_id} is outside the vocabulary [0, {info.vocab_size})", "tokens")


# ---------------------------------------------------------------- responses


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object: ``prompt_tokens_details.cached_tokens`` (read from the prefix cache), and for chat
    ``completion_tokens_details.reasoning_tokens`` (the thinking a reasoning parser took out of the answer)."""
    counts: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:
        counts["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return counts


def _lp(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def token_name(token: TokenLogprob | TopLogprob, as_ids: bool = False) -> str:
    """A logprob entry's token: its text, or ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids``, for
    clients that need the exact token where texts collide or are not whole characters)."""
    return f"token_id:{token.token_id}" if as_ids else token.token


def completion_logprobs(
    tokens: list[TokenLogprob], start_offset: int, prompt: list[TokenLogprob] | None = None, as_ids: bool = False,
    top_k: int | None = None,
) -> dict[str, list]:
    """Legacy completions format; ``text_offset`` counts characters from the start of the returned text (of the
    tokens' texts, also when ``as_ids`` names them ``token_id:<id>``).

    ``prompt`` (echo with logprobs) comes first, from offset 0; its first token has null logprobs, as in
    OpenAI's and vLLM's answers. ``top_k`` cuts each top list (the prompt's are scored with the larger of
    ``logprobs`` and ``prompt_logprobs``).
    """
    offsets, offset = [], 0
    for token in prompt or []:
        offsets.append(offset)
        offset += len(token.token)
    offset = start_offset
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    every = [*(prompt or []), *tokens]
    return {
        "tokens": [token_name(t, as_ids) for t in every],
        "token_logprobs": [None if t.logprob is None else _lp(t.logprob) for t in every],
        "top_logprobs": [
            None if t.logprob is None else {token_name(top, as_ids): _lp(top.logprob)
                                            for top in _first(t.top, top_k)}
            for t in every
        ],
        "text_offset": offsets,
    }


def _first(tops: list[TopLogprob], k: int | None) -> list[TopLogprob]:
    """The ``k`` likeliest of a token's alternatives: all of them for None, or for -1 (the whole vocabulary)."""
    return tops if k is None or k < 0 else tops[:k]


def prompt_logprobs(prompt: list[TokenLogprob], k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first (nothing predicts it), else the token
    itself and the ``k`` likeliest, keyed by token id: ``{"logprob", "rank", "decoded_token"}``."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for token in prompt:
        if token.logprob is None:
            out.append(None)
            continue
        entry = {str(token.token_id): {"logprob": _lp(token.logprob), "rank": token.rank, "decoded_token": token.token}}
        for rank, top in enumerate(_first(token.top, k), start=1):
            entry.setdefault(str(top.token_id), {"logprob": _lp(top.logprob), "rank": rank, "decoded_token": top.token})
        out.append(entry)
    return out


def _token_bytes(token: TokenLogprob | TopLogprob) -> list[int]:
    """The engine's raw token bytes (part of a UTF-8 character, for a byte token); its text only if it sent none."""
    return list(token.bytes) if token.bytes else list(token.token.encode("utf-8"))


def chat_logprobs(tokens: list[TokenLogprob], as_ids: bool = False) -> dict[str, list]:
    """Chat's format; ``bytes`` are the token's own bytes also when ``as_ids`` names it ``token_id:<id>``."""
    return {
        "content": [
            {
                "token": token_name(t, as_ids),
                "logprob": _lp(t.logprob),
                "bytes": _token_bytes(t),
                "top_logprobs": [
                    {"token": token_name(top, as_ids), "logprob": _lp(top.logprob), "bytes": _token_bytes(top)}
                    for top in t.top
                ],
            }
            for t in tokens
        ]
    }


def model_logprobs(entries: list[TokenAnalysis]) -> list[dict[str, Any]]:
    """Per generated token: its text and id, ``shift`` (the proxy's logprob of it minus the base's) and each
    distribution (``base``, ``expert``, ``anti_expert``..., ``proxy``) with the token's logprob and the top k."""
    return [
        {
            "token": entry.token,
            "token_id": entry.token_id,
            "shift": _lp(entry.shift),
            "models": {
                model.role: {
                    "logprob": _lp(model.logprob),
                    "top_logprobs": [
                        {"token": top.token, "token_id": top.token_id, "logprob": _lp(top.logprob)} for top in model.top
                    ],
                }
                for model in entry.models
            },
        }
        for entry in entries
    ]


def model_card(model_id: str, created: int, root: str, max_model_len: int | None,
               parent: str | None = None) -> dict[str, Any]:
    """vLLM's card: ``root`` the weights' path, ``parent`` the model id this one is a part or variant of; with
    the fields Anthropic's clients read on the same path (``type``, ``display_name``, ``created_at``)."""
    card: dict[str, Any] = {
        "id": model_id, "object": "model", "created": created, "owned_by": "proxy-serve", "root": root,
        "parent": parent, "type": "model", "display_name": model_id,
        "created_at": datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z"),
    }
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


Endpoint = Literal["completions", "chat"]
