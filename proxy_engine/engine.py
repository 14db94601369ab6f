"""The step loop: requests in, then every step decode the running batch in all models, combine, sample, and
prefill newcomers within the token budget.

    sequences = engine.make_sequences(request_id, prompt, params)   # intake.py: validate, render, one per choice
    engine.add(sequences)       # any thread; refused when the queue is full (the scheduler's rule)
    outputs = engine.step()     # inbox -> decode + combine + sample -> admit / prefill a chunk -> retire

``ProxyEngine`` is synchronous and owns every tensor; ``AsyncEngine`` (async_engine.py) runs it in a thread.
Requests and aborts arrive through a locked inbox drained at the start of each step, so a new request joins
the batch at the next step and an aborted one leaves at once. Requests become sequences in intake.py, on the
caller's thread. Where each sequence is, the scheduler says (scheduler.py); the prefill group (prefill.py),
the sampling batch (sampling.py) and the output builder (outputs.py) do the work of their phase.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable

import torch

from proxy_engine.analysis import Distribution, model_logprobs
from proxy_engine.combine import Contribution, combine
from proxy_engine.config import EngineConfig, ExpertPairConfig
from proxy_engine.device_memory import out_of_memory
from proxy_engine.executor import KV_MEMORY_FRACTION, running_cap, static_kv_plans, wants_static
from proxy_engine.fast_decode import FastDecoder
from proxy_engine.intake import Intake
from proxy_engine.kv_budget import KVBudgetExceeded, budget_for, fitted_max_lens
from proxy_engine.layout import ModelLayout
from proxy_engine.loader import LoadedModel, eos_token_ids, input_device, load_models
from proxy_engine.model_files import max_model_len_error
from proxy_engine.outputs import OutputBuilder
from proxy_engine.prefill import PrefillGroup
from proxy_engine.prefix_cache import FREE_MEMORY_SHARE, kv_bytes_per_token
from proxy_engine.prefix_cache import for_model as prefix_cache_for
from proxy_engine.request import (
    EngineOverloadedError,
    ErrorCode,
    FinishReason,
    NoTokenAllowedError,
    PairNotFoundError,
    PromptInput,
    PromptTokens,
    RequestOutput,
    SamplingParams,
    Target,
    TokenAnalysis,
    TokenLogprob,
)
from proxy_engine.runner import ModelRunner
from proxy_engine.sampling import SamplingBatch
from proxy_engine.scheduler import MEMORY_GROW_STEPS, Scheduler, has_room, with_running_cap
from proxy_engine.sequence import Sequence
from proxy_engine.step_tokens import StepTokens

log = logging.getLogger("proxy_engine.engine")

# Tests inject faults with it: called with a phase ("decode", "prefill", "sample") and its sequences.
FaultHook = Callable[[str, list[Sequence]], None]
# Analysis mode (as in the research code): called with the sequences and their combined logits [B, V].
LogitsHook = Callable[[list[Sequence], torch.Tensor], None]


class ProxyEngine:
    """Three (or more) models in lockstep over one continuously batched set of sequences."""

    def __init__(self, models: list[LoadedModel], config: EngineConfig) -> None:
        self.config = config
        self.models = models
        self.tokenizer = models[0].tokenizer
        self.roles = [m.roles for m in models]  # per model, every role it plays (layout.py)
        self.vocab_size = models[0].vocab_size or len(self.tokenizer)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        too_long = max_model_len_error(config.limits.max_model_len, {m.role: m.max_len for m in models})
        if too_long is not None and not config.limits.allow_long_max_model_len:
            raise ValueError(too_long)
        cap = config.limits.max_model_len or 10**9
        if too_long is not None:  # allowed: every model takes the limit as set
            log.warning("%s: served anyway (allow_long_max_model_len); outputs past a model's context may be wrong",
                        too_long.split(";")[0])
            self.max_lens = [cap for _ in models]
        else:
            self.max_lens = [min(m.max_len, cap) for m in models]
        self.kv_bytes_per_token = [kv_bytes_per_token(m.model) for m in models]
        devices = [input_device(m.model) for m in models]
        # The growable caches' K/V budget per device (on the CPU by default: the OS's OOM killer is no exception to
        # recover from), and a context short enough for one sequence to fit it.
        names = self._device_names = [str(d) for d in devices]
        self.kv_memory = {name: budget_for(device, config.runtime.kv_cache_memory)
                          for name, device in dict(zip(names, devices)).items()}
        self.max_lens = fitted_max_lens(self.kv_memory, names, self.kv_bytes_per_token, self.max_lens,
                                        config.limits.max_model_len is not None)
        # Static K/V buffers (the CUDA executor's) for the limits within the GPUs' free memory, leaving the
        # prefix caches their share of it (prefix_cache.FREE_MEMORY_SHARE) when they are on.
        kv_fraction = KV_MEMORY_FRACTION - (FREE_MEMORY_SHARE if config.prefix_cache.enabled else 0.0)
        utilization = config.runtime.gpu_memory_utilization
        slot_plans = static_kv_plans(self.kv_bytes_per_token, devices, config.limits.max_num_seqs, self.max_lens,
                                     kv_fraction, [wants_static(m.model, d, config.runtime, max_len)
                                                   for m, d, max_len in zip(models, devices, self.max_lens)],
                                     utilization)
        # The running batch never outgrows the static buffers: fewer slots than max_num_seqs cap it.
        self.limits = with_running_cap(config.limits, running_cap(slot_plans, config.limits.max_num_seqs))
        # Each model's KV bytes when every sequence the batch holds is at the length cap: the budget at the limits.
        self.kv_budgets = [
            per_token * self.limits.max_num_seqs * max_len
            for per_token, max_len in zip(self.kv_bytes_per_token, self.max_lens)
        ]
        self._pad_id, self._slot_plans = pad_id, slot_plans
        self._decoders: dict[int, FastDecoder] = {}  # id(model) -> its fast step: runners over one model share it
        self.runners: list[ModelRunner] = []
        layout = ModelLayout.of(config)
        for index in range(len(models)):
            self.runners.append(self._runner(index, layout.budget_host(index)))
        self.eos_ids = frozenset(eos_token_ids(models))
        self.device = self.runners[0].device
        self.scheduler = Scheduler(self.limits)
        self.outputs = OutputBuilder(self.tokenizer)
        self.intake = Intake(models, config, self.max_lens, self.vocab_size, self.eos_ids, self.outputs, self.device)
        self.grammars, self.tool_call_format = self.intake.grammars, self.intake.tool_call_format
        self.prefill: PrefillGroup | None = None
        self._synced_version = 0
        self.prompt_tokens_total = 0
        self.step_tokens = StepTokens()
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self.fault_hook: FaultHook | None = None
        self.logits_hook: LogitsHook | None = None
        # Pairs added and removed while serving (add_pair, remove_pair): the plan as the callers see it, under
        # _pairs_lock, which the step thread takes up at its next step (_changes).
        self._pairs_lock = threading.Lock()
        self._pairs = list(config.experts)
        self._loaded = list(models)
        self._retired: frozenset[int] = frozenset()  # removed pairs (they keep their index)
        # Slots no live pair uses -> the pair count when that came about: never shared by a pair added since.
        self._unshared: dict[int, int] = {}
        self._retiring: set[int] = set()  # of those, the slots whose memory is not freed yet (step thread)
        self._released: set[int] = set()  # and those freed: no sequence may use them (under _lock)
        self._changes: list[tuple[Callable[[], object], concurrent.futures.Future]] = []
        self._no_more_changes: BaseException | None = None  # fail_changes: the step loop is gone

    def _runner(self, index: int, host: int | None = None) -> ModelRunner:
        """The runner of model ``index``, over the fast step another runner of the same module already built, its
        prefix cache within runner ``host``'s budget when given (``ModelLayout.budget_host``)."""
        m, config = self.models[index], self.config
        device = self._device_names[index]
        host_cache = self.runners[host].prefix_cache if host is not None and host < len(self.runners) else None
        runner = ModelRunner(
            m.model, self.vocab_size, self._pad_id, m.role, runtime=config.runtime,
            prefix_cache=prefix_cache_for(config.prefix_cache, m.model, m.role, self.kv_budgets[index],
                                          config.runtime.gpu_memory_utilization,
                                          None if host_cache is None else host_cache.pool),
            slot_plan=self._slot_plans[index], max_len=self.max_lens[index], adapter=m.adapter,
            fast=self._decoders.get(id(m.model)), kv_budget=self.kv_memory[device],
        )
        if runner.fast is not None:
            self._decoders.setdefault(id(m.model), runner.fast)
        return runner

    def kv_cache_usage(self) -> float:
        """How full the K/V is, 0-1 (vLLM's kv_cache_usage_perc, what autoscalers read): the live tokens of the
        running rows and the prompts being prefilled over the cache at the limits, or, where a device has a K/V
        budget that binds first, what its caches hold over it, whichever is fuller."""
        held = [budget.in_use() / budget.limit for budget in self.kv_memory.values() if budget is not None]
        return max([self._live_kv_share(), *held]) if held else self._live_kv_share()

    def _live_kv_share(self) -> float:
        used = 0
        jobs = self.prefill.jobs if self.prefill is not None else {}
        for index, runner in enumerate(self.runners):
            tokens = runner.kv_tokens()
            job = jobs.get(index)
            if job is not None and not job.complete:  # a complete job's rows are the runner's now
                tokens += job.cache.length * job.ids.shape[0]
            used += tokens * self.kv_bytes_per_token[index]
        total = sum(self.kv_budgets)
        return min(1.0, used / total) if total else 0.0

    # --- requests in ---------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return min(self.max_lens)

    @property
    def num_pairs(self) -> int:
        return self.intake.num_pairs

    def render(self, prompt: PromptInput, target: Target = Target.PROXY) -> list[int]:
        return self.intake.render(prompt, target)

    def tokens(self, prompt: PromptInput, target: Target = Target.PROXY) -> PromptTokens:
        return self.intake.tokens(prompt, target)

    def make_sequences(
        self, request_id: str, prompt: PromptInput, params: SamplingParams, target: Target = Target.PROXY,
        first_index: int = 0,
    ) -> list[Sequence]:
        """Validate and render a request into its ``n`` sequences (intake.py); ``ValueError`` says what is wrong."""
        return self.intake.make_sequences(request_id, prompt, params, target, first_index)

    def add(self, sequences: list[Sequence]) -> None:
        """Queue sequences (any thread); ``EngineOverloadedError`` when the waiting queue is full."""
        with self._lock:
            if self._released and any(index in self._released for s in sequences for index in s.prompts):
                raise PairNotFoundError("the expert pair this request was rendered for has been removed")
            if not has_room(self.limits, len(sequences), self.num_waiting, self.scheduler.in_batch):
                raise EngineOverloadedError(
                    f"the server is at capacity ({self.config.limits.max_waiting} sequences may wait); retry shortly"
                )
            self._inbox.extend(sequences)

    def abort(self, request_id: str) -> None:
        """Abort every sequence of a request (any thread); takes effect at the next step."""
        with self._lock:
            self._aborts.add(request_id)

    # --- expert pairs added and removed while serving -------------------------------------------------------------
    def add_pair(self, pair: ExpertPairConfig, replace: bool = False) -> concurrent.futures.Future:
        """Load an expert pair into the running engine (vLLM's runtime LoRA loading), served under its name alone:
        it never joins the default combination (``in_default`` false), so the model ids configured at start-up
        answer as before. Its expert is a PEFT adapter over a model the engine runs, its anti-expert that model
        (a LoRA runs unmerged over it where lora.py can, else merged into a copy). ``replace``: a pair of that name
        added earlier is removed in the same step (vLLM's ``load_inplace``: the adapter's files changed).

        The loading runs on the calling thread while the engine serves; the step thread takes the pair up at its
        next step, and the returned future then holds the engine's pairs. ``ValueError`` saying why a pair cannot be
        added: no name or a name in use, an expert that is no adapter, an anti-expert the engine does not run, an
        adapter that does not fit."""
        from proxy_engine.adapter import resolve_pair

        with self._pairs_lock:
            self._check_changes_open()
            if pair.name is None:
                raise ValueError("a pair added while serving needs a name: it is served under that name alone")
            pairs, retired, unshared, unused = list(self._pairs), self._retired, self._unshared, frozenset()
            existing = self._pair_index(pair.name)
            if existing is not None:
                if not replace:
                    raise ValueError(f"an expert pair named {pair.name!r} is already served")
                pairs, retired, unused, _ = self._without(pairs, existing)
                unshared = self._unshared_since(unused, len(pairs))  # never shared by the new adapter's model
            pair = resolve_pair(pair.model_copy(update={"in_default": False}), len(pairs))
            if pair.expert.adapter is None:
                raise ValueError(f"{pair.expert.path} is not a PEFT adapter (a directory holding "
                                 "adapter_config.json): a pair added while serving is an adapter over a model the "
                                 "server runs")
            config = self.config.model_copy(update={"experts": [*pairs, pair]})
            layout = ModelLayout.of(config, retired, unshared)
            expert, anti = layout.pairs[-1]
            # A new pair never shares an unshared slot, so an anti-expert among the loaded slots is a live one.
            if anti >= len(self._loaded) or pair.anti_expert.adapter is not None:
                raise ValueError(f"the anti-expert {pair.anti_expert.path} is not a checkpoint this server runs: an "
                                 "adapter is added over one of them (the base's or an anti-expert's)")
            if expert >= len(self._loaded) and layout.adapter_host(expert) != anti:
                raise ValueError(f"the adapter {pair.expert.adapter} does not run over the anti-expert's model")
            models = load_models(config, self._loaded, layout)
            pairs.append(pair)
            planned = (self._pairs, self._loaded, self._retired, self._unshared)
            self._pairs, self._loaded, self._retired, self._unshared = pairs, models, retired, unshared
            log.info("expert pair %r %s: %s over %s (served under its name alone)", pair.name,
                     "replaced" if existing is not None else "added", pair.expert.adapter, pair.anti_expert.path)

            def take() -> list[ExpertPairConfig]:
                try:
                    return self._take_pairs(pairs, models, layout, unused)
                except BaseException:
                    # The engine serves what it did; so does the plan, unless a later change already built on it
                    # (or is loading: the step thread never waits for a load).
                    if self._pairs_lock.acquire(blocking=False):
                        try:
                            if self._pairs is pairs:
                                self._pairs, self._loaded, self._retired, self._unshared = planned
                        finally:
                            self._pairs_lock.release()
                    raise

            return self._change(take)

    def remove_pair(self, name: str) -> concurrent.futures.Future:
        """Stop serving the pair named ``name``, one served under its name alone: its model ids go at once (the future
        holds the engine's pairs once the step thread has taken the change), its sequences already queued or
        running finish, and then its adapter (or merged copy) is freed. ``PairNotFoundError`` when no such pair is
        served; ``ValueError`` for a pair that steers the default model."""
        with self._pairs_lock:
            self._check_changes_open()
            index = self._pair_index(name)
            if index is None:
                raise PairNotFoundError(f"no expert pair named {name!r} is served")
            pairs, self._retired, unused, layout = self._without(self._pairs, index)
            self._unshared = self._unshared_since(unused, len(pairs))
            self._pairs, loaded = pairs, self._loaded
            log.info("expert pair %r removed: its running requests finish, then its memory is freed", name)
            return self._change(lambda: self._take_pairs(pairs, loaded, layout, unused))

    def _check_changes_open(self) -> None:
        if self._no_more_changes is not None:  # nothing would take the change up: say so before loading anything
            raise self._no_more_changes

    def _unshared_since(self, slots: frozenset[int], pairs: int) -> dict[int, int]:
        """The unshared slots with ``slots`` added, which no pair from index ``pairs`` on may share."""
        return {**self._unshared, **dict.fromkeys(slots, pairs)}

    def _pair_index(self, name: str) -> int | None:
        return next((i for i, pair in enumerate(self._pairs) if pair.name == name), None)

    def _without(self, pairs: list[ExpertPairConfig], index: int
                 ) -> tuple[list[ExpertPairConfig], frozenset[int], frozenset[int], ModelLayout]:
        """``pairs`` with pair ``index`` retired (unnamed, out of the default: it keeps its index, so that every
        later pair's stays put), the retired pairs, the slots no live pair uses any more, and the layout without it.
        ``ValueError`` for a pair of the default combination (removing it would change what the default model id
        answers)."""
        if pairs[index].in_default:
            raise ValueError(f"the expert pair {pairs[index].name!r} steers the default model: only pairs served under "
                             "their name alone (in_default: false, added while serving or --lora-modules) can be "
                             "removed or replaced (restart without it)")
        pairs = list(pairs)
        pairs[index] = pairs[index].model_copy(update={"name": None, "in_default": False})
        retired = self._retired | {index}
        # Every pair keeps its slots (ModelLayout.of): the pair's own that no live pair uses are the ones it frees.
        layout = ModelLayout.of(self.config.model_copy(update={"experts": pairs}), retired, self._unshared)
        return pairs, retired, frozenset(set(layout.pairs[index]) - layout.live_slots()), layout

    def _change(self, change: Callable[[], object]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._no_more_changes is not None:  # no step loop will take it up
                future.set_exception(self._no_more_changes)
            else:
                self._changes.append((change, future))
        return future

    def _take_pairs(self, pairs: list[ExpertPairConfig], models: list[LoadedModel], layout: ModelLayout,
                    unused: set[int] | frozenset[int] = frozenset()) -> list[ExpertPairConfig]:
        """On the step thread: runners for the new models, then the layout requests render with, then the pairs
        (in that order: a model id is routable only once everything it needs is in place). A runner that cannot be
        built (no memory for its buffers) leaves the engine as it was."""
        # A new model is an adapter over a running one (its host): the same shapes, context and device.
        as_its_host = (self.max_lens, self.kv_bytes_per_token, self.kv_budgets, self._device_names, self._slot_plans)
        served = len(self.runners)
        try:
            for index in range(served, len(models)):
                host = layout.adapter_host(index)
                assert host is not None
                for values in as_its_host:
                    values.append(values[host])
                self.models.append(models[index])
                self.runners.append(self._runner(index, layout.budget_host(index)))
        except BaseException:
            for values in (*as_its_host, self.models, self.runners):
                del values[served:]
            raise
        self.roles = [m.roles for m in self.models]
        self.intake.layout = layout
        self.config.experts = list(pairs)
        self._retiring |= set(unused)
        return list(pairs)

    def _release_unused(self) -> None:
        """Free the models of removed pairs once no sequence uses them (its rows are gone at the last sync)."""
        with self._lock:
            used = {index for s in [*self.scheduler.active(), *self._inbox] for index in s.prompts}
            for index in sorted(self._retiring - used):
                if self.runners[index].num_rows:
                    continue
                self.runners[index].release()
                self.models[index].model = None
                self._retiring.discard(index)
                self._released.add(index)
                log.info("%s: freed (its expert pair was removed)", self.runners[index].name)

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    @property
    def num_prefilling(self) -> int:
        return len(self.scheduler.prefilling)

    def named_pairs_in_use(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The names of the pairs whose model ids running (or prefilling) sequences were asked of, and those of
        queued ones: vLLM's running and waiting LoRA adapters. On the step thread."""
        names = [pair.name for pair in self.config.experts]
        if not any(names):  # the common case: no walk over the queue at every step
            return (), ()

        def named(sequences) -> tuple[str, ...]:
            return tuple(sorted({name for s in sequences if s.pair is not None and (name := names[s.pair])}))

        scheduler = self.scheduler
        return named(itertools.chain(scheduler.running, scheduler.prefilling)), named(scheduler.waiting)

    @property
    def generation_tokens_total(self) -> int:
        return self.outputs.generation_tokens_total

    @property
    def preemptions_total(self) -> int:
        return self.scheduler.preemptions_total

    def has_work(self) -> bool:
        # A runner still holding rows has finished sequences' rows to free (at the next step's sync).
        return bool(
            self.scheduler.has_work() or self._inbox or self._aborts or self._changes or self._retiring
            or any(r.num_rows for r in self.runners)
        )

    # --- the step ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        before = self.prompt_tokens_total + self.generation_tokens_total
        outputs = self._step()
        self.step_tokens.observe(self.prompt_tokens_total + self.generation_tokens_total - before)
        return outputs

    def _step(self) -> list[RequestOutput]:
        self._apply_changes()
        outputs = self._drain_inbox()
        self._sync_rows()
        if self._retiring:
            self._release_unused()
        if self.scheduler.running:
            self._fit_decode_in_kv_budgets()
            outputs += self._guarded("decode", self.scheduler.running, self._decode)
            # Free the rows of the sequences that just finished before admitting: a prefill completing in this
            # step hands its rows over at once, and the runners must never hold more than the batch's slots
            # (static K/V buffers would regrow and drop their CUDA graphs).
            self.scheduler.retire()
            self._sync_rows()
        if not self.scheduler.prefilling:  # done, failed or aborted: the next group may start
            self.prefill = None
            preempted = self.scheduler.preempt()
            if preempted:  # their slots go to more urgent sequences: free the rows before the prefill starts
                log.info("preempted %d sequence(s) for more urgent ones (%s); they resume by recomputation",
                         len(preempted), ", ".join(sorted({s.request_id for s in preempted})))
                self._sync_rows()
            if self.config.prefix_cache.enabled:
                admitted = self.scheduler.admit(self._cached_prefix, self.config.prefix_cache.block_size)
            else:
                admitted = self.scheduler.admit()
            if admitted:
                self.prefill = PrefillGroup(admitted, self.runners, self.vocab_size, self.device)
        if self.prefill is not None:
            outputs += self._guarded("prefill", self.prefill.sequences, self._prefill)
        self.scheduler.retire()
        return outputs

    def _guarded(
        self, phase: str, sequences: list[Sequence], run: Callable[[], list[RequestOutput]]
    ) -> list[RequestOutput]:
        """Run a batch phase; if it raises, fail the sequences it concerns and keep serving the rest."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(phase, sequences)
            return run()
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the engine
            if phase == "decode" and out_of_memory(error) and self._preempt_for_memory(error):
                return []
            if phase == "prefill" and out_of_memory(error) and self._defer_prefill_for_memory(error):
                return []
            log.exception("engine %s step failed for %d sequences", phase, len(sequences))
            failed = [self.outputs.fail(s, phase, error) for s in sequences if not s.finished]
            # The batch may have failed for lack of memory: give its rows back now, not at the next step.
            self.scheduler.retire()
            self._sync_rows(force=True)  # a prefill may have failed half-way through handing its rows over
            return failed

    def _preempt_for_memory(self, error: BaseException) -> bool:
        """A decode step ran out of memory: preempt the whole batch (the step may have grown some models' K/V
        and not others', so every row goes) and cap it at half; False, to fail it as any error, when a single
        sequence was running (nothing smaller would fit)."""
        if sum(not s.finished for s in self.scheduler.running) < 2:
            return False
        victims = self.scheduler.preempt_all()
        self._sync_rows(force=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the freed K/V back to the driver's pool before the smaller batch regrows
        log.warning("%s in a decode step of %d sequences: all preempted (they resume by recomputation), the batch "
                    "capped at %d and growing back by one every %d steps; %s", _shortage(error), len(victims),
                    self.scheduler.memory_cap, MEMORY_GROW_STEPS, _remedy(error, "max_num_seqs or max_model_len"))
        return True

    def _fit_decode_in_kv_budgets(self) -> None:
        """Preempt the least urgent running sequences until the next decode step's regrowth fits each device's K/V
        budget, as vLLM preempts when its free blocks run out (each resumes by recomputation; the batch is capped at
        those left, growing back as memory_cap does). The last one is left to the step: its regrowth without
        headroom, or its failure."""
        def several_running() -> bool:
            return sum(not s.finished for s in self.scheduler.running) > 1

        if not several_running() or self._decode_fits():
            return
        for budget in self.kv_memory.values():  # first the caches' headroom (what their rows do not need)
            if budget is not None:
                budget.trim()
        victims: list[Sequence] = []
        while several_running() and not self._decode_fits():  # then streams
            victims.append(self.scheduler.preempt_least_urgent())
            self._sync_rows()
        if victims:
            log.warning("the K/V budget cannot hold the next decode step: preempted %d sequence(s) (%s), which "
                        "resume by recomputation; the batch capped at %d (--kv-cache-memory sets the budget)",
                        len(victims), ", ".join(sorted({s.request_id for s in victims})), self.scheduler.memory_cap)

    def _decode_fits(self) -> bool:
        """Whether every runner's regrowth for the next decode step fits its device's K/V budget (runner by
        runner, as the step grows them)."""
        for name, budget in self.kv_memory.items():
            if budget is None:
                continue
            room: int | None = None  # the budget is only walked when a cache would grow
            for runner, device in zip(self.runners, self._device_names):
                if device != name or not runner.grows_next_step():
                    continue
                room = budget.limit - budget.in_use() if room is None else room
                need = runner.decode_growth(room)
                if need is None:
                    return False
                room -= need
        return True

    def _cached_prefix(self, sequence: Sequence) -> int:
        """Tokens of the sequence's prompt that its primary model's prefix cache holds (what admission keeps
        together: scheduler.admit); 0 for a prompt scored position by position, which computes every one."""
        index = sequence.runners[0]
        cache = self.runners[index].prefix_cache
        if cache is None or not sequence.reuses_cache:
            return 0
        return len(cache.reusable(sequence.context_ids(index), sequence.cache_salt)) * cache.block_size

    def _defer_prefill_for_memory(self, error: BaseException) -> bool:
        """A prefill ran out of memory before any of its sequences took a token: drop the group's partial K/V and
        queue its sequences again, at the front, to be prefilled in smaller groups. The batch is capped at the
        sequences running (new ones join as running ones finish), or at half the group when none runs. False, to
        fail it as any error, for a lone prompt with nothing running (nothing smaller would fit)."""
        group = self.prefill
        if group is None or group.took_tokens():
            return False
        running = sum(not s.finished for s in self.scheduler.running)
        deferred = [s for s in group.sequences if not s.finished]
        if running + len(deferred) < 2:
            return False
        self.scheduler.defer_prefilling(running or len(deferred) // 2)
        self.prefill = None
        self._sync_rows(force=True)  # hand_over is all or nothing: this only checks the runners hold no row of it
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("%s prefilling %d sequence(s) beside %d running: queued again, the batch capped at %d and "
                    "growing back by one every %d steps; %s", _shortage(error), len(deferred), running,
                    self.scheduler.memory_cap, MEMORY_GROW_STEPS,
                    _remedy(error, "max_num_seqs, max_num_batched_tokens or max_model_len"))
        return True

    def fail_changes(self, error: BaseException) -> None:
        """The step loop is gone (stopped, or crashed): the callers waiting on pair changes hear so, and so will
        those who ask for one from now on."""
        with self._lock:
            changes, self._changes = self._changes, []
            self._no_more_changes = error
        for _, future in changes:
            future.set_exception(error)

    def _apply_changes(self) -> None:
        """Pairs added or removed since the last step (add_pair, remove_pair), in the order they were asked."""
        with self._lock:
            changes, self._changes = self._changes, []
        for change, future in changes:
            try:
                future.set_result(change())
            except Exception as error:  # noqa: BLE001 - handed to the caller
                log.exception("changing the expert pairs failed")
                future.set_exception(error)

    def _drain_inbox(self) -> list[RequestOutput]:
        """New sequences join the waiting queue; aborted and timed-out ones leave, wherever they are."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        self.scheduler.add(inbox)
        now = time.monotonic()
        expired = {s.request_id for s in self.scheduler.active() if s.deadline is not None and now > s.deadline}
        if not aborts and not expired:
            return []
        leaving = self.scheduler.remove(lambda s: s.request_id in aborts or s.request_id in expired)
        return [self._end_early(s, aborted=s.request_id in aborts) for s in leaving]

    def _end_early(self, sequence: Sequence, aborted: bool) -> RequestOutput:
        if aborted:
            return self.outputs.finish(sequence, FinishReason.ABORT)
        message = f"the request timed out after {self.config.limits.request_timeout_s:g}s"
        return self.outputs.finish(sequence, FinishReason.ERROR, error=message, error_code=ErrorCode.TIMEOUT)

    def _sync_rows(self, force: bool = False) -> None:
        """Make every runner hold exactly the running sequences that use it (once a step, before decode)."""
        if self._synced_version == self.scheduler.running_version and not force:
            return  # nobody joined or left since the last sync
        self._synced_version = self.scheduler.running_version
        for index, runner in enumerate(self.runners):
            runner.keep_rows([s.seq_id for s in self.scheduler.running if index in s.prompts])

    # --- decode and prefill ----------------------------------------------------------------------------------
    def _decode(self) -> list[RequestOutput]:
        sequences = self.scheduler.running
        position = {s.seq_id: row for row, s in enumerate(sequences)}
        by_id = {s.seq_id: s for s in sequences}
        parts: dict[int, Contribution] = {}
        # Launch every model before reading any result: on GPUs the forwards overlap.
        for batch in _decode_batches(self.runners):
            members = [[by_id[seq_id] for seq_id in self.runners[index].seq_ids] for index in batch]
            tokens = [torch.tensor([s.last_token for s in rows], dtype=torch.long) for rows in members]
            if len(batch) == 1:
                logits = [self.runners[batch[0]].decode(tokens[0])]
            else:  # runners over one model (an anti-expert and its unmerged LoRA experts): one pass
                logits = ModelRunner.decode_together([self.runners[index] for index in batch], tokens)
            for index, rows, model_logits in zip(batch, members, logits):
                parts[index] = Contribution.of(model_logits, [position[s.seq_id] for s in rows],
                                               [s.weights[index] for s in rows])
        outputs = self._sample_and_emit(sequences, parts)
        self.scheduler.decoded()
        return outputs

    def _prefill(self) -> list[RequestOutput]:
        group = self.prefill
        assert group is not None
        # Running rows each cost one token this step; the rest of the budget goes to prompts.
        running = sum(not s.finished for s in self.scheduler.running)
        group.advance(max(16, self.config.limits.max_num_batched_tokens - running))
        if not group.complete:
            return []
        group.cache_prompts()  # complete: its prompts' full blocks go to each model's prefix cache
        alive = [s for s in group.sequences if not s.finished]
        # max_tokens 0 (echo, scoring a prompt): the prompt is all there is.
        sampled = [s for s in alive if s.max_tokens > 0]
        # Rows for those that may outlive their first token, before any token is taken or counted: a failure to
        # hand over (out of memory) leaves every sequence as it was, to be prefilled again
        # (_defer_prefill_for_memory).
        handed = [s for s in sampled if s.max_tokens > 1]
        group.hand_over(handed)
        self.prompt_tokens_total += sum(s.primary_prompt_len for s in alive if not s.resumed)
        emitted: dict[Sequence, RequestOutput] = {}
        if sampled:
            emitted.update(zip(sampled, self._sample_and_emit(sampled, group.first_contributions(sampled))))
        scored: dict[int, list[TokenLogprob]] = {}  # a prompt shared by several choices is converted once
        for sequence in alive:
            if sequence.max_tokens == 0:
                emitted[sequence] = self.outputs.finish(sequence, FinishReason.LENGTH)
            if sequence.index % sequence.params.n == 0 and not sequence.resumed:  # a prompt's first choice's usage
                emitted[sequence].cached_tokens = group.cached_tokens(sequence)
            scores = group.scores.get(sequence.seq_id)
            if scores is not None:
                if id(scores) not in scored:
                    scored[id(scores)] = self.outputs.prompt_logprobs(scores)
                emitted[sequence].prompt_logprobs = scored[id(scores)]
        self.scheduler.promote(group.sequences)
        if any(s.finished for s in handed):  # stopped at their first token: their rows go now
            self._sync_rows(force=True)
        return [emitted[s] for s in alive]

    # --- sampling --------------------------------------------------------------------------------------------
    def _sample_and_emit(self, sequences: list[Sequence], parts: dict[int, Contribution]) -> list[RequestOutput]:
        """Combine each model's logits (``parts``, by runner index), then process, sample and emit one token for
        each sequence.

        If the batch fails (one request's bad value deep in a logit processor, say), every row is retried on
        its own, so only the rows that fail again end with an error.
        """
        combined = combine(len(sequences), self.vocab_size, list(parts.values()), self.device)
        try:
            chosen = self._choose(sequences, combined, parts)
        except Exception as error:  # noqa: BLE001
            if not isinstance(error, NoTokenAllowedError):  # that one is a request's own doing: no alarm
                if len(sequences) == 1:
                    raise
                log.warning("sampling a batch of %d failed (%s); retrying row by row", len(sequences), error)
            chosen = []
            for row, sequence in enumerate(sequences):
                try:
                    chosen += self._choose([sequence], combined[row : row + 1], _only_row(parts, row))
                except NoTokenAllowedError as row_error:
                    log.info("request %s: %s", sequence.request_id, row_error)
                    chosen.append(row_error)
                except Exception as row_error:  # noqa: BLE001
                    log.exception("sampling failed for request %s", sequence.request_id)
                    chosen.append(row_error)
        return [
            self.outputs.fail(sequence, "sampling", choice) if isinstance(choice, Exception)
            else self.outputs.advance(sequence, *choice)
            for sequence, choice in zip(sequences, chosen)
        ]

    def _choose(
        self, sequences: list[Sequence], combined: torch.Tensor, parts: dict[int, Contribution]
    ) -> list[tuple[int, list[TokenLogprob] | None, list[TokenAnalysis] | None]]:
        """Each row's token, logprobs and per-model logprobs; touches no sequence state but the generators it
        draws from."""
        if self.fault_hook is not None:
            self.fault_hook("sample", sequences)
        if self.logits_hook is not None:
            self.logits_hook(sequences, combined)
        batch = SamplingBatch.build(sequences, combined.device)
        tokens = batch.sample(batch.process(combined))
        analyses: list[list[Distribution] | None] = [None] * len(tokens)
        wanted = [s.params.model_logprobs for s in sequences]
        if any(k is not None for k in wanted):  # analysis mode: free unless a row asked for it
            analyses = model_logprobs(parts, combined, tokens, wanted, self.roles)
        return [
            (token, None if lp is None else [self.outputs.token_logprob(sequence, token, *lp)],
             None if analysis is None else [self.outputs.token_analysis(sequence, token, analysis)])
            for sequence, token, lp, analysis in zip(
                sequences, tokens, batch.top_logprobs(combined, tokens), analyses
            )
        ]


def _decode_batches(runners: list[ModelRunner]) -> list[list[int]]:
    """The runners with rows, by index, in groups that decode together: those sharing one fast step (one model,
    lora.py) in one group, every other runner alone."""
    batches: dict[int, list[int]] = {}
    for index, runner in enumerate(runners):
        if runner.num_rows:
            key = id(runner.fast) if runner.fast is not None else -1 - index
            batches.setdefault(key, []).append(index)
    return list(batches.values())


def _only_row(parts: dict[int, Contribution], row: int) -> dict[int, Contribution]:
    """The contributions to one batch row, as row 0 of a batch of one (the row-by-row sampling retry)."""
    alone = {}
    for index, part in parts.items():
        hits = (part.rows == row).nonzero().flatten()
        if hits.numel():
            alone[index] = Contribution(torch.zeros(1, dtype=torch.long), part.weights[hits],
                                        part.logits[hits.to(part.logits.device)])
    return alone


def _shortage(error: BaseException) -> str:
    """What ran out, for the log: the device's memory, or the K/V budget (kv_budget.py)."""
    return "the K/V budget (--kv-cache-memory) ran out" if isinstance(error, KVBudgetExceeded) else "out of memory"


def _remedy(error: BaseException, limits: str) -> str:
    """What the deployer can change, for the log: the budget where it is what ran out, else the limits."""
    if isinstance(error, KVBudgetExceeded):
        return f"raise --kv-cache-memory (where the machine has the memory) or lower {limits} to avoid it"
    return f"lower {limits} to avoid it"
