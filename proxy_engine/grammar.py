"""Structured outputs: a request's constraint (JSON schema, regex, choice, grammar) as a per-sequence token mask.

The engine is llguidance (see docs/structured-outputs.md for the comparison with xgrammar and outlines-core):
it compiles a JSON schema, a regex or a Lark grammar in milliseconds whatever the vocabulary, and computes each
step's mask lazily from the tokenizer's token trie, so a request with a new schema costs no precomputation.

- ``StructuredOutput``: what a request asks for (crosses the engine boundary inside ``SamplingParams``).
- ``GrammarCompiler``: one per engine; turns a ``StructuredOutput`` into a ``GrammarMatcher`` (``ValueError``
  naming what is wrong when it cannot), caching compiled grammars by key (LRU). It runs where prompts are
  rendered, off the step thread.
- ``GrammarMatcher``: one per sequence; says which tokens of the SHARED vocabulary may come next and whether
  the output may end here, and advances with each accepted token.
- ``allowed_mask``: the ``[B, V]`` boolean mask of a batch whose rows are constrained or free.

JSON is compact by default (no whitespace between tokens): a weak model cannot stall in whitespace, so under a
finite schema it ends in valid JSON within a small ``max_tokens``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")
# No whitespace between JSON tokens, "," and ":" alone as separators (what json.dumps(separators=(",", ":"))
# writes): the output is deterministic in shape and a random model cannot loop on spaces.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
MAX_SPEC_CHARS = 256 * 1024  # a schema or grammar larger than this is refused before compiling
DEFAULT_CACHE_SIZE = 256


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a request's output.

    ``kind`` / ``value``: ``json_object`` (any JSON object; value unused), ``json_schema`` (a schema dict),
    ``regex`` (a pattern, matched in full), ``choice`` (a list of strings: exactly one of them), ``grammar``
    (a Lark grammar, llguidance's dialect, or GBNF as llama.cpp writes it).
    """

    kind: Kind
    value: Any = None

    def key(self) -> str:
        """A canonical string for the cache: equal constraints compile once."""
        return self.kind + ":" + json.dumps(self.value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        value = self.value
        if self.kind == "json_schema" and not isinstance(value, (dict, bool)):
            raise ValueError("a JSON schema must be an object")
        if self.kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise ValueError(f"the {self.kind} must be a non-empty string")
        if self.kind == "choice" and (
            not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value)
        ):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        if len(self.key()) > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} is larger than {MAX_SPEC_CHARS} characters")


def grammar_source(spec: StructuredOutput) -> str:
    """llguidance's grammar text for a constraint (not yet checked: ``GrammarCompiler`` does that)."""
    import llguidance

    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT_JSON)
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=COMPACT_JSON)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        # Lark string literals are JSON strings: any text is a literal, with nothing to escape by hand.
        alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in spec.value)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    from llguidance.gbnf_to_lark import any_to_lark

    # Lark as it is; GBNF (llama.cpp's format, which vLLM also accepts) translated to Lark.
    return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.value))


class GrammarMatcher:
    """A sequence's position in its grammar. ``fill`` writes the allowed-next-token bits; ``accept`` advances."""

    def __init__(self, matcher, vocab_size: int, words: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.words = words  # int32 words per bitmask row (the tokenizer's width, which may pass vocab_size)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this row's allowed tokens into ``bitmask [B, words]`` (int32, on the CPU)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, bitmask, row)

    @property
    def can_end(self) -> bool:
        """Whether the output may end here (the grammar is satisfied)."""
        return self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing more can follow: the output is complete."""
        return self._matcher.is_stopped()

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False if the grammar refuses it (the matcher is then in error)."""
        return self._matcher.consume_token(token)

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """Compiles constraints against one tokenizer; thread-safe, so prompts can render in any worker thread.

    ``vocab_size`` is the engine's shared vocabulary, which may be narrower than the tokenizer (tokens past it
    are cut from every model's logits): masks are computed over the tokenizer and read up to ``vocab_size``.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int], cache_size: int = DEFAULT_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.cache_size = cache_size
        self._lltok = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def mask_words(self) -> int:
        """int32 words per row of a bitmask (one bit per token of the tokenizer's vocabulary)."""
        return (self._width + 31) // 32

    @property
    def _width(self) -> int:
        return max(self.vocab_size, len(self.tokenizer))

    def _tokenizer(self):
        # Converting the tokenizer takes a moment (about a second for a 128k vocabulary): once, on first use.
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                self._lltok = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self._width, eos_token=self.eos_ids or None
                )
            return self._lltok

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for one sequence; ``ValueError`` naming the problem if the constraint cannot compile."""
        spec.validate()
        key = spec.key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.hits += 1
        if template is None:
            template = self._compile(spec)
            with self._lock:
                self.misses += 1
                self._cache[key] = template
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return GrammarMatcher(template.deep_copy(), self.vocab_size, self.mask_words)

    def _compile(self, spec: StructuredOutput):
        import llguidance

        try:
            source = grammar_source(spec)
        except (ValueError, TypeError) as error:
            raise ValueError(f"invalid {_NAMES[spec.kind]}: {error}") from None
        tokenizer = self._tokenizer()
        problem = llguidance.LLMatcher.validate_grammar(source, tokenizer)
        if problem:
            raise ValueError(f"invalid {_NAMES[spec.kind]}: {problem.strip()}")
        matcher = llguidance.LLMatcher(tokenizer, source, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {_NAMES[spec.kind]}: {matcher.get_error()}")
        return matcher


_NAMES = {"json_object": "JSON object format", "json_schema": "JSON schema", "regex": "regex", "choice": "choice",
          "grammar": "grammar"}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, words]`` int32 (bit ``j`` of word ``w`` is token ``32 w + j``) to ``[B, vocab_size]`` bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def allowed_mask(
    matchers: Sequence[GrammarMatcher | None],
    stop_ids: Sequence[Sequence[int]],
    vocab_size: int,
    words: int,
) -> tuple[list[int], torch.Tensor] | None:
    """The constrained rows and their ``[len(rows), vocab_size]`` allowed tokens, or None if no row is constrained.

    End-of-sequence follows the grammar, not the tokenizer: a row's stop ids (EOS, a chat expert's end of turn,
    the request's ``stop_token_ids``) are allowed exactly where its grammar may end, and nowhere else.
    """
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return None
    bitmask = torch.zeros((len(rows), words), dtype=torch.int32)
    for i, row in enumerate(rows):
        matchers[row].fill(bitmask, i)
    allowed = unpack_bitmask(bitmask, vocab_size)
    for i, row in enumerate(rows):
        ids = [t for t in stop_ids[row] if 0 <= t < vocab_size]
        # A grammar with no way on within the shared vocabulary (every continuation cut) may only end.
        if ids:
            allowed[i, ids] = matchers[row].can_end or not bool(allowed[i].any())
    return rows, allowed


def apply_grammar_masks(
    logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None], stop_ids: Sequence[Sequence[int]], words: int
) -> torch.Tensor:
    """Set ``-inf`` on every token a row's grammar forbids (in place); free rows are untouched."""
    found = allowed_mask(matchers, stop_ids, logits.shape[-1], words)
    if found is None:
        return logits
    rows, allowed = found
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    constrained = logits.index_select(0, index)
    constrained.masked_fill_(~allowed.to(logits.device), float("-inf"))
    logits.index_copy_(0, index, constrained)
    return logits
