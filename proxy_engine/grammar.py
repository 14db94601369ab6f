"""Structured outputs: a request's constraint (JSON schema, regex, choice, grammar) as a per-sequence token mask.

The engine is llguidance (see docs/structured-outputs.md for the comparison with xgrammar and outlines-core):
it compiles a JSON schema, a regex or a Lark grammar in milliseconds whatever the vocabulary, and computes each
step's mask lazily from the tokenizer's token trie, so a request with a new schema costs no precomputation.

- ``StructuredOutput``: what a request asks for (crosses the engine boundary inside ``SamplingParams``).
- ``GrammarCompiler``: one per engine; turns a ``StructuredOutput`` into a ``GrammarMatcher`` (``ValueError``
  naming what is wrong when it cannot), caching compiled grammars by key (LRU, bounded by bytes). Compiles run
  in its own thread (``compile_threads``), off the step thread and off the threads that render other requests,
  each within a time budget; the first steps of a fresh grammar are tried at compile time, so a grammar that
  cannot run (llguidance's row limit, say) is refused before the request is admitted.
- ``GrammarMatcher``: one per sequence; says which tokens of the SHARED vocabulary may come next and whether
  the output may end here, and advances with each accepted token.
- ``allowed_mask``: the ``[B, V]`` boolean mask of a batch whose rows are constrained or free.

JSON is compact by default (no whitespace between tokens): a weak model cannot stall in whitespace, so under a
finite schema it ends in valid JSON within a small ``max_tokens``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")
# No whitespace between JSON tokens, "," and ":" alone as separators (what json.dumps(separators=(",", ":"))
# writes): the output is deterministic in shape and a random model cannot loop on spaces.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
MAX_SPEC_CHARS = 256 * 1024  # a schema or grammar larger than this is refused before compiling
# Nesting of a schema (objects and arrays): deeper ones are refused before anything walks them recursively
# (pickling a request to the engine process failed with RecursionError from about 240 levels; OpenAI allows 10).
MAX_SPEC_DEPTH = 64
DEFAULT_CACHE_BYTES = 256 * 2**20
DEFAULT_COMPILE_TIMEOUT_S = 5.0
# Matcher memory per character of grammar source, measured: about 200 bytes for JSON schemas (2.2 MB for a
# 10 KB grammar, 27 MB for 215 KB), less for regexes. The cache counts this estimate (it cannot ask llguidance).
BYTES_PER_SOURCE_CHAR = 256
ENTRY_OVERHEAD_BYTES = 64 * 1024
PROBE_STEPS = 4  # forced tokens followed at compile time (a schema's "{" is one) to find a grammar that cannot run
MAX_ERROR_CHARS = 300
# Threads that render requests with a constraint (they wait for the compiler there, never in the pool that
# renders plain requests).
CONSTRAINED_RENDER_THREADS = 16


class ConstraintError(ValueError):
    """A constraint that does not compile: a 400 naming the request field it came from (``param``), when known."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a request's output.

    ``kind`` / ``value``: ``json_object`` (any JSON object; value unused), ``json_schema`` (a schema dict),
    ``regex`` (a pattern, matched in full), ``choice`` (a list of strings: exactly one of them), ``grammar``
    (a Lark grammar, llguidance's dialect, or GBNF as llama.cpp writes it).
    """

    kind: Kind
    value: Any = None
    # The request field it came from (``response_format``, ``tools``, ...): what a constraint that does not compile
    # names in its 400. Not part of the constraint.
    param: str | None = field(default=None, compare=False)

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
        if json_depth(value, MAX_SPEC_DEPTH) > MAX_SPEC_DEPTH:
            raise ValueError(f"the {self.kind} is nested more than {MAX_SPEC_DEPTH} levels deep")
        if len(self.key()) > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} is larger than {MAX_SPEC_CHARS} characters")


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value (a scalar is 0, ``{}`` or ``[]`` is 1), counted without recursion; the
    count stops once it passes ``limit`` (the answer is then ``limit + 1``)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return limit + 1
        stack.extend((child, depth + 1) for child in children)
    return deepest


def clip_error(message: str) -> str:
    """llguidance's error, short: its non-verbose marker dropped, at most ``MAX_ERROR_CHARS`` characters."""
    message = message.replace("<non-verbose/>", "").strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."


class GrammarBusyError(RuntimeError):
    """The compiler was busy with other grammars for the whole time budget: retry (a 429, not the client's
    fault). ``retry_after_s`` as ``EngineOverloadedError``'s."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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
    try:
        lark = any_to_lark(spec.value)
    except Exception as error:  # noqa: BLE001 - its GbnfToLarkError, or a bare Exception ("No 'root' rule found"):
        raise ValueError(str(error)) from None  # either way the grammar as written, a 400
    return llguidance.LLMatcher.grammar_from_lark(lark)


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
        return clip_error(self._matcher.get_error())


@dataclass(eq=False)
class _Compiled:
    value: Any  # the template matcher, or the error message of a constraint that cannot compile
    nbytes: int


@dataclass(eq=False)
class _Pending:
    """A compile queued or running; every request waiting for it has a deadline (the latest one counts)."""

    deadline: float
    started: bool = False
    future: concurrent.futures.Future | None = None


class GrammarCompiler:
    """Compiles constraints against one tokenizer; thread-safe, so prompts can render in any worker thread.

    ``vocab_size`` is the engine's shared vocabulary, which may be narrower than the tokenizer (tokens past it
    are cut from every model's logits): masks are computed over the tokenizer and read up to ``vocab_size``.

    A compile runs in the compiler's own pool of ``compile_threads`` (one by default: grammar bombs queue behind
    each other and take one core at most). A request waits for its grammar at most ``compile_timeout_s``: a
    compile still running then is a ``ValueError`` (400: the constraint is too costly), one that never started
    is a ``GrammarBusyError`` (429: retry). llguidance cannot be interrupted, so a compile past its budget runs
    on in its thread; its result (or error) is cached, so a retry costs nothing. Errors are cached too.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int], *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                 compile_threads: int = 1):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.cache_bytes = cache_bytes
        self.compile_timeout_s = compile_timeout_s
        self._lltok = None
        # Keyed by a digest of the constraint: a 256 KB schema's key is 32 bytes here.
        self._cache: OrderedDict[bytes, _Compiled] = OrderedDict()
        self._pending: dict[bytes, _Pending] = {}
        self.nbytes = 0
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(compile_threads, thread_name_prefix="proxy-grammar",
                                                           initializer=lower_priority)
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
        """A fresh matcher for one sequence; ``ConstraintError`` naming the problem (and the request field the
        constraint came from) if it cannot compile, or not within the budget; ``GrammarBusyError`` if the compiler
        had no time for it."""
        try:
            compiled = self.compiled(spec)
        except ValueError as error:
            raise ConstraintError(str(error), spec.param) from None
        return GrammarMatcher(compiled.deep_copy(), self.vocab_size, self.mask_words)

    def compiled(self, spec: StructuredOutput):
        """The constraint's template matcher: from the cache, or compiled in the compiler's thread (waited for)."""
        spec.validate()
        key = hashlib.sha256(spec.key().encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            else:
                pending = self._pending.get(key)
                deadline = time.monotonic() + self.compile_timeout_s
                if pending is None:
                    self.misses += 1
                    pending = self._pending[key] = _Pending(deadline)
                    pending.future = self._pool.submit(self._run, key, spec, pending)
                else:  # the same constraint is being compiled for another request: wait for that one
                    pending.deadline = max(pending.deadline, deadline)
        if entry is None:
            assert pending.future is not None
            try:
                entry = pending.future.result(self.compile_timeout_s)
            except concurrent.futures.TimeoutError:
                if pending.started:
                    raise ValueError(f"the {_NAMES[spec.kind]} did not compile within {self.compile_timeout_s:g} s "
                                     "(limits.grammar_compile_timeout_s): simplify it") from None
                raise GrammarBusyError("the grammar compiler is busy with other requests; retry shortly") from None
        if isinstance(entry.value, str):
            raise ValueError(entry.value)
        return entry.value

    def _run(self, key: bytes, spec: StructuredOutput, pending: _Pending) -> _Compiled:
        """The compiler thread: compile (unless every waiter has given up), cache and return the entry."""
        try:
            if time.monotonic() > pending.deadline:
                raise GrammarBusyError("the grammar compiler is busy with other requests; retry shortly")
            pending.started = True
            try:
                try:
                    source = grammar_source(spec)
                except (ValueError, TypeError) as error:
                    raise ValueError(f"invalid {_NAMES[spec.kind]}: {clip_error(str(error))}") from None
                value: Any = self._compile(spec, source)
                nbytes = ENTRY_OVERHEAD_BYTES + BYTES_PER_SOURCE_CHAR * len(source)
            except ValueError as error:
                value, nbytes = str(error), ENTRY_OVERHEAD_BYTES // 64
            entry = _Compiled(value, nbytes)
            self._put(key, entry)
            return entry
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _put(self, key: bytes, entry: _Compiled) -> None:
        with self._lock:
            if entry.nbytes > self.cache_bytes:
                return  # larger than the whole cache: used once, not kept
            self._cache[key] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self.nbytes -= old.nbytes

    def _compile(self, spec: StructuredOutput, source: str):
        import llguidance

        # Short errors: the verbose ones carry the parser state and the whole grammar (up to hundreds of KB).
        limits = llguidance.LLParserLimits(verbose_errors=False)
        matcher = llguidance.LLMatcher(self._tokenizer(), source, log_level=0, limits=limits)
        problem = matcher.get_error() if matcher.is_error() else probe(matcher)
        if problem:
            raise ValueError(f"invalid {_NAMES[spec.kind]}: {clip_error(problem)}")
        return matcher


COMPILE_NICENESS = 10


def lower_priority() -> None:
    """Run this thread (a compiler's) at a lower CPU priority than the step thread and the event loop: on a
    busy machine a grammar bomb's seconds of compiling then take the CPU they leave, not the CPU they need.
    Linux gives each thread its own nice value; elsewhere this does nothing."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + COMPILE_NICENESS))
    except (AttributeError, OSError):
        pass


def probe(matcher) -> str | None:
    """The error a fresh matcher hits in its first steps (None if it can run): follow its forced tokens and
    compute each next mask, as generation would. A JSON schema with ~500 optional properties compiles, then
    fails on its first token ("Current row has 2003 items; max is 2000"): that is a 400 now, not a 500 later."""
    trial = matcher.deep_copy()
    for _ in range(PROBE_STEPS):
        forced = trial.compute_ff_tokens()
        if forced:
            trial.consume_tokens(forced)
        trial.compute_bitmask()
        if trial.is_error():
            return trial.get_error()
        if not forced:
            return None
    return None


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
