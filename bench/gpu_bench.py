"""GPU benchmark: the engine's proxy-tuned decode against the paper's naive loop and the bandwidth floor.

    python -m bench.gpu_bench                       # 7B-shaped base, 1.1B-shaped pair, bf16, cuda:0 (bench/gpu.sh)
    python -m bench.gpu_bench --quick               # smaller shapes, fewer steps
    python -m bench.gpu_bench --cpu --quick         # tiny shapes on the CPU: the code path, in tests

The three models share a 32,000-token vocabulary and are built directly on the device with random weights
(nothing is written to disk). Everything below is measured in one run, one section after another; a section
that fails is reported (with its traceback) and the next one runs. The report is rewritten after each section.

1. ``bandwidth``: a device-to-device copy of 1 GiB; the floor is the three models' weights read once per step.
2. ``paper loop``: the paper's released decode loop (three transformers forwards with their own caches, then
   ``base + (expert - anti)``, argmax, the tokens read back each step), proxy-tuned and the base alone.
3. ``engine`` with CUDA graphs and with ``enforce_eager``: ms per decode step and tokens/s of ``proxy``
   (alpha 1), ``base`` (``Target.BASE``) and ``expert`` (``Target.EXPERT``, half of the pair's own cost), once
   every sequence runs (prefill excluded); the graphs' capture time and memory.
4. ``host profile``: ``cProfile`` of 16 proxy-tuned steps with graphs at the most streams (the host's part of a
   step, and the wait for the GPU); ``ttft``: time to first token of a 1,500-token prompt (one request alone,
   prefill in one chunk).
5. ``identity``: greedy tokens with graphs vs eager (bf16 real shapes: divergences with the top-2 margin of the
   combined logits where they part), and on a float32 family (exact); seeded sampling with vs without graphs.
6. ``attention``: the decode attention of the pair's shape per SDPA backend (host + device time per call, the
   span growing by one each call as in decoding, or fixed as in a bucket).
7. ``lora``: the expert as a rank-16 LoRA over the anti-expert, unmerged under the static step (lora.py: one
   copy of the pair's weights, the terms captured in the expert's graphs) against merged into a copy: proxy ms
   per step and weight bytes (what ``lora_mode: auto`` trades on a GPU).
8. ``fusions`` (last: the longest, and the least needed should gpu.sh's time box cut it): each fusion of the
   static step undone on its own, timed with a graph and eagerly at 1 and 16 rows, on the base and the pair's
   shapes, and the kernels of one eager step by device time (``bench/fusions.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import fusions
from proxy_engine.config import (
    EngineConfig,
    ExpertPairConfig,
    LimitsConfig,
    ModelConfig,
    PrefixCacheConfig,
    RuntimeConfig,
)
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import LoadedModel
from proxy_engine.prompts import PromptRenderer
from proxy_engine.request import PromptInput, SamplingParams, Target

VOCAB = 32_000
TTFT_PROMPT = 1_500
FUSION_STEPS = 16  # steps per variant per round (3 rounds): about a minute for the 7B and 1.1B shapes together


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


# Llama-2-7B and TinyLlama-1.1B (grouped-query attention) shapes.
BASE_7B = Shape("7B", 4096, 32, 32, 32, 11008)
PAIR_1B = Shape("1.1B", 2048, 22, 32, 4, 5632)
BASE_QUICK = Shape("1.3B", 2048, 24, 16, 16, 5504)
PAIR_QUICK = Shape("160M", 768, 12, 12, 4, 2048)
BASE_CPU = Shape("tiny", 128, 2, 4, 2, 256)
PAIR_CPU = Shape("tinier", 64, 1, 2, 1, 128)
FP32_SHAPE = Shape("fp32-small", 256, 4, 8, 2, 512)  # the float32 family of the exactness check


def tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer with exactly ``vocab`` ids ("t0" ... ): the engine needs one, nothing reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    raw = Tokenizer(models.WordLevel(words, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="t2", pad_token="t0", unk_token="t0")


def build(shape: Shape, device: str, dtype: torch.dtype, seed: int, role: str, tok) -> LoadedModel:
    """A random Llama of ``shape`` built in place on ``device`` (no float32 copy, no disk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                         eos_token_id=2, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # whatever the initialiser left, the benchmark needs finite weights
        for parameter in model.parameters():
            if not bool(torch.isfinite(parameter).all()):
                parameter.normal_(0.0, 0.02)
    renderer = PromptRenderer(tok, "plain", "{{ messages }}", None)
    # Named per role: two random models of one shape are two models (equal configs would share one: layout.py).
    model_config = ModelConfig(path=f"random-{shape.name}-{role}", device=device if device != "cpu" else "cpu")
    return LoadedModel(role=role, config=model_config, model=model, tokenizer=tok, renderer=renderer, max_len=4096,
                       logits_width=VOCAB, vocab_size=VOCAB)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def weight_bytes(models: list[LoadedModel]) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.model.parameters())


# --- 1. bandwidth --------------------------------------------------------------------------------------------
def copy_bandwidth(device: str, size: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy of ``size`` bytes."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    sync()
    return 2 * size * repeats / (time.perf_counter() - start)


# --- 2. the paper's loop -------------------------------------------------------------------------------------
@torch.inference_mode()
def paper_loop(models: list[LoadedModel], prompts: list[list[int]], steps: int, proxy: bool) -> float:
    """ms per step of the paper's decode loop (proxy-tuned, or the base alone): each model a transformers forward
    with its own cache, ``base + (expert - anti)``, argmax, the tokens read back (its end-of-text check)."""
    from transformers import DynamicCache

    from proxy_engine.runner import cache_kwarg

    used = models if proxy else models[:1]
    ids = torch.tensor(prompts, device=used[0].model.device)
    caches = [DynamicCache() for _ in used]
    nxt = None

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        logits = [m.model(input_ids=tokens.to(m.model.device), use_cache=True,
                          **{cache_kwarg(m.model): cache}).logits[:, -1]
                  for m, cache in zip(used, caches)]
        if not proxy:
            return logits[0].argmax(-1)
        base, expert, anti = (x.float().to(logits[0].device) for x in logits)
        return (base + (expert - anti)).argmax(-1)

    nxt = forward(ids)
    for _ in range(2):
        nxt = forward(nxt[:, None])
        nxt.tolist()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        nxt = forward(nxt[:, None])
        nxt.tolist()
    return (time.perf_counter() - start) / steps * 1000


# --- 3. the engine -------------------------------------------------------------------------------------------
def make_engine(models: list[LoadedModel], max_rows: int, max_len: int, eager: bool, executor: str) -> ProxyEngine:
    config = EngineConfig(
        base=models[0].config, experts=[ExpertPairConfig(expert=models[1].config, anti_expert=models[2].config)],
        limits=LimitsConfig(max_num_seqs=max_rows, max_model_len=max_len, max_num_batched_tokens=2048),
        prefix_cache=PrefixCacheConfig(enabled=False),  # random prompts; and the TTFT prompt must be computed
        runtime=RuntimeConfig(enforce_eager=eager, decode_executor=executor, engine_process=False),
    )
    return ProxyEngine(models, config)


@contextmanager
def decoding(engine: ProxyEngine, prompts: list[list[int]], steps: int, target: Target = Target.PROXY,
             tag: str = "run"):
    """Every prompt decoding greedily (prefill done, two warm steps: allocator, kernels) with room for ``steps``
    more tokens each; the engine drained on exit."""
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add(engine.make_sequences(f"{tag}-{target.serves.value}-{i}-{time.monotonic_ns()}",
                                         PromptInput(token_ids=prompt), params, target))
    try:
        while len(engine.running) < len(prompts):
            engine.step()
        for _ in range(2):
            engine.step()
        sync()
        yield
    finally:
        while engine.has_work():
            engine.step()


def decode_rate(engine: ProxyEngine, prompts: list[list[int]], steps: int, target: Target) -> tuple[float, float]:
    """``(ms per decode step, tokens/s)`` once every sequence runs; prefill excluded."""
    with decoding(engine, prompts, steps, target):
        start = time.perf_counter()
        tokens = 0
        for _ in range(steps):
            tokens += sum(len(o.new_token_ids) for o in engine.step())  # each step ends in a host sync (tolist)
        elapsed = time.perf_counter() - start
    return elapsed / steps * 1000, tokens / elapsed


def engine_rates(engine: ProxyEngine, prompts: list[list[int]], levels: list[int], steps: int,
                 repeats: int) -> dict:
    rows = {}
    for level in levels:
        samples: dict[str, list[tuple[float, float]]] = {"proxy": [], "base": [], "expert": []}
        for _ in range(repeats):  # interleaved
            for name, target in (("proxy", Target.PROXY), ("base", Target.BASE), ("expert", Target.EXPERT)):
                samples[name].append(decode_rate(engine, prompts[:level], steps, target))
        ms = {name: statistics.median(s[0] for s in values) for name, values in samples.items()}
        rate = {name: statistics.median(s[1] for s in values) for name, values in samples.items()}
        rows[str(level)] = {"ms_per_step": ms, "tokens_per_s": rate,
                            "proxy / (base + 2 x expert)": ms["proxy"] / (ms["base"] + 2 * ms["expert"]),
                            "proxy / base": ms["proxy"] / ms["base"]}
        print(f"  {level:3d} streams: proxy {ms['proxy']:.2f} ms, base {ms['base']:.2f} ms, expert "
              f"{ms['expert']:.2f} ms per step; proxy {rate['proxy']:.0f} tok/s, base {rate['base']:.0f} tok/s",
              flush=True)
    return rows


def random_lora(model: torch.nn.Module, rank: int = 16, seed: int = 7):
    """A ``LoraAdapter`` with drawn terms on every projection of ``model`` (what an adapter file would load)."""
    from proxy_engine.lora import LoraAdapter, LoraTerm

    generator = torch.Generator(device="cpu").manual_seed(seed)
    terms = {}
    for layer in model.model.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            out_features, in_features = module.weight.shape
            down = torch.randn(rank, in_features, generator=generator) * 0.02
            up = torch.randn(out_features, rank, generator=generator) * 0.02
            terms[module] = LoraTerm(down.to(module.weight), up.to(module.weight))
    return LoraAdapter("random", terms)


def merged_copy(loaded: LoadedModel, adapter, role: str) -> LoadedModel:
    """``loaded`` with ``adapter`` merged into a copy of its weights (W + B A), as ``lora_mode: merged`` serves."""
    import copy
    import dataclasses

    model = copy.deepcopy(loaded.model)
    modules = dict(loaded.model.named_modules())
    copies = dict(model.named_modules())
    with torch.no_grad():
        for name, module in modules.items():
            term = adapter.terms.get(module)
            if term is not None:
                copies[name].weight += (term.up.float() @ term.down.float()).to(module.weight.dtype)
    return dataclasses.replace(loaded, role=role, model=model,
                               config=loaded.config.model_copy(update={"path": f"{loaded.config.path}-merged"}))


def lora_rates(models: list[LoadedModel], prompts: list[list[int]], levels: list[int], steps: int, max_len: int,
               executor: str) -> dict:
    """Proxy ms per step with the expert a LoRA over the anti-expert: unmerged (the terms in the static step)
    against merged into a copy, engines started one after the other, levels interleaved."""
    import dataclasses

    base, _, anti = models
    adapter = random_lora(anti.model)
    unmerged = dataclasses.replace(anti, role="expert", adapter=adapter,
                                   config=anti.config.model_copy(update={"path": f"{anti.config.path}-lora"}))
    variants = {"unmerged": [base, unmerged, anti], "merged": [base, merged_copy(anti, adapter, "expert"), anti]}
    out: dict = {"weights_gb": {}, "rates": {}}
    engines = {}
    for name, loaded in variants.items():
        models_held = {id(m.model): m.model for m in loaded}.values()
        held = sum(p.numel() * p.element_size() for m in models_held for p in m.parameters())
        out["weights_gb"][name] = (held + sum(m.adapter.nbytes for m in loaded if m.adapter)) / 1e9
        engines[name] = make_engine(loaded, levels[-1], max_len, False, executor)
    for level in levels:
        ms = {name: decode_rate(engine, prompts[:level], steps, Target.PROXY)[0] for name, engine in engines.items()}
        out["rates"][str(level)] = {"ms_per_step": ms, "unmerged / merged": ms["unmerged"] / ms["merged"]}
        print(f"  {level:3d} streams: unmerged {ms['unmerged']:.2f} ms, merged {ms['merged']:.2f} ms per step",
              flush=True)
    return out


def capture_info(engine: ProxyEngine) -> dict:
    info = {}
    for runner in engine.runners:
        static = runner._static
        report = static.capture_report if static is not None else None
        info[runner.name] = {
            "executor": runner.executor,
            "graphs": report.graphs if report else 0,
            "capture_s": round(report.seconds, 3) if report else 0.0,
            "graph_pool_mib": round(report.pool_bytes / 2**20, 1) if report else 0.0,
            "kv_slots": static.cache.slots if static else None,
            "kv_capacity": static.cache.capacity if static else None,
            "kv_gib": round(static.cache.nbytes() / 2**30, 3) if static else None,
        }
    return info


def require_graphs(runners: dict, device: str) -> None:
    """On CUDA, a graphs-against-eager comparison means nothing unless graphs were captured (a failed capture
    leaves a model eager, and the comparison would be eager against eager)."""
    if device != "cpu" and not all(info.get("graphs") for info in runners.values()):
        raise RuntimeError(f"not every model captured CUDA graphs ({json.dumps(runners)}): no comparison")


def host_profile(engine: ProxyEngine, prompts: list[list[int]], steps: int = 16, top: int = 20) -> dict:
    """Where an engine step's time goes on the host: ``cProfile`` over ``steps`` proxy-tuned decode steps of
    ``len(prompts)`` rows, the functions by their own time per step. On CUDA the wait for the GPU shows as the
    own time of the call that reads the sampled tokens back (``tolist``); the rest is the host's part of the
    step (graph launches, combine, sampling, detokenizing), the part a graph spanning the three models and the
    combine could save (docs/gpu.md, "Not done")."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    with decoding(engine, prompts, steps, tag="host"):
        started = time.perf_counter()
        profiler.enable()
        for _ in range(steps):
            engine.step()
        profiler.disable()
        elapsed = time.perf_counter() - started
    entries = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, _)
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {"rows": len(prompts), "profiled_ms_per_step": round(elapsed / steps * 1000, 3),
            "top": [{"function": f"{Path(file).name}:{line} {name}", "calls_per_step": round(calls / steps, 1),
                     "own_ms_per_step": round(own / steps * 1000, 4), "cum_ms_per_step": round(cum / steps * 1000, 4)}
                    for (file, line, name), (_, calls, own, cum, _) in ranked]}


# --- 4. time to first token ----------------------------------------------------------------------------------
def ttft(engine: ProxyEngine, prompt_tokens: int, repeats: int = 3) -> dict:
    gen = torch.Generator().manual_seed(7)
    times = []
    for attempt in range(repeats + 1):  # the first one warms the prefill kernels of that length
        prompt = torch.randint(10, VOCAB, (prompt_tokens,), generator=gen).tolist()
        engine.add(engine.make_sequences(f"ttft-{attempt}", PromptInput(token_ids=prompt),
                                         SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)))
        sync()
        start = time.perf_counter()
        while not any(o.new_token_ids for o in engine.step()):
            pass
        elapsed = (time.perf_counter() - start) * 1000
        while engine.has_work():
            engine.step()
        if attempt:
            times.append(elapsed)
    return {"prompt_tokens": prompt_tokens, "ms": statistics.median(times), "all_ms": [round(t, 2) for t in times]}


# --- 5. identity ---------------------------------------------------------------------------------------------
def greedy_run(engine: ProxyEngine, prompts: list[list[int]], tokens: int,
               params: SamplingParams | None = None) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Each prompt's tokens, and per step the top-2 margin of its combined logits."""
    margins: dict[str, list[float]] = {}

    def hook(sequences, combined):
        top = combined.float().topk(2, dim=-1).values
        for sequence, (first, second) in zip(sequences, top.tolist()):
            margins.setdefault(sequence.request_id, []).append(first - second)

    engine.logits_hook = hook
    params = params or SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    out: dict[str, list[int]] = {}
    try:
        for i, prompt in enumerate(prompts):
            engine.add(engine.make_sequences(f"id-{i}", PromptInput(token_ids=prompt), params))
        while engine.has_work():
            for output in engine.step():
                out.setdefault(output.request_id, []).extend(output.new_token_ids)
    finally:
        engine.logits_hook = None
    return out, margins


def compare(graphed: tuple[dict, dict], eager: tuple[dict, dict]) -> dict:
    """Identical sequences, and each divergence with the top-2 margins where the two runs part."""
    (tokens_a, margins_a), (tokens_b, margins_b) = graphed, eager
    divergences = []
    for key in sorted(tokens_a):
        a, b = tokens_a[key], tokens_b.get(key, [])
        if a == b:
            continue
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        divergences.append({"request": key, "step": step,
                            "margin_graphs": round(margins_a[key][step], 5) if step < len(margins_a[key]) else None,
                            "margin_eager": round(margins_b[key][step], 5) if step < len(margins_b[key]) else None})
    return {"sequences": len(tokens_a), "identical": len(tokens_a) - len(divergences), "divergences": divergences}


# --- 6. attention backends -----------------------------------------------------------------------------------
def attention_backends(device: str, dtype: torch.dtype, shape: Shape, rows: int, spans: list[int],
                       calls: int = 50) -> dict:
    """µs per decode attention call (host + device, the stream synced at the end) per backend: ``fixed`` span
    (a bucket) and ``growing`` (one more column per call: a new shape each time, as an unbucketed decode)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d = shape.hidden // shape.heads
    group = shape.heads // shape.kv_heads
    results: dict[str, dict] = {}
    backends = {"efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH],
                "cudnn": [SDPBackend.CUDNN_ATTENTION]}
    for span in spans:
        q = torch.randn(rows, shape.kv_heads, group, d, device=device, dtype=dtype)
        k = torch.randn(rows, shape.kv_heads, span + calls, d, device=device, dtype=dtype)
        v = torch.randn_like(k)
        for name, chosen in backends.items():
            for mode in ("fixed", "growing"):
                def call(i: int, span: int = span, mode: str = mode, q=q, k=k, v=v) -> torch.Tensor:
                    width = span + (i if mode == "growing" else 0)
                    mask = torch.zeros(rows, 1, 1, width, device=device, dtype=dtype)
                    return F.scaled_dot_product_attention(q, k[:, :, :width], v[:, :, :width], attn_mask=mask)
                try:
                    with sdpa_kernel(chosen):
                        call(0)
                        sync()
                        start = time.perf_counter()
                        for i in range(calls):
                            call(i)
                        sync()
                    us = (time.perf_counter() - start) / calls * 1e6
                    results.setdefault(f"span {span}", {})[f"{name} {mode}"] = round(us, 1)
                except RuntimeError as error:
                    results.setdefault(f"span {span}", {})[f"{name} {mode}"] = f"unavailable: {str(error)[:80]}"
    return results


# --- the run -------------------------------------------------------------------------------------------------
class Report:
    def __init__(self, out: Path, stem: str) -> None:
        self.data: dict = {"sections": {}, "errors": {}}
        self.out, self.stem = out, stem
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, run: Callable[[], object]) -> object:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the peak printed below is this section's
        try:
            value = run()
        except Exception as error:  # noqa: BLE001 - the next sections still run
            traceback.print_exc()
            self.data["errors"][name] = f"{type(error).__name__}: {error}"
            value = None
        else:
            self.data["sections"][name] = value
        seconds = time.perf_counter() - started
        memory = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                  if torch.cuda.is_available() else "")
        print(f"   ({seconds:.1f}s{memory})", flush=True)
        self.save()
        return value

    def save(self) -> None:
        (self.out / f"{self.stem}.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / f"{self.stem}.md").write_text(markdown(self.data))


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(data: dict) -> str:
    s = data["sections"]
    lines = [f"device {data.get('device')}, {data.get('dtype')}; base {data.get('base')}, pair {data.get('pair')} x 2; "
             f"vocab {VOCAB}; prompts {data.get('prompt_tokens')} tokens; {data.get('steps')} decode steps", ""]
    floor = s.get("bandwidth", {}) or {}
    if floor:
        lines.append(f"copy bandwidth {floor['copy_tb_s']:.2f} TB/s; weights {floor['weights_gb']:.2f} GB; "
                     f"floor {floor['floor_ms']:.2f} ms per proxy step")
        lines.append("")
    paper = s.get("paper loop") or {}
    lines += ["| ms per decode step | streams | proxy | base | expert | proxy / (base + 2 expert) | proxy tok/s "
              "| base tok/s | proxy vs paper loop | proxy / floor |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in ("engine, graphs", "engine, eager"):
        for level, row in (s.get(label) or {}).get("rates", {}).items():
            ms, rate = row["ms_per_step"], row["tokens_per_s"]
            peer = (paper.get(level) or {}).get("proxy_ms")
            lines.append(f"| {label} | {level} | {ms['proxy']:.2f} | {ms['base']:.2f} | {ms['expert']:.2f} | "
                         f"{row['proxy / (base + 2 x expert)']:.2f}x | {rate['proxy']:.0f} | {rate['base']:.0f} | "
                         f"{_fmt(peer / ms['proxy'] if peer else None)}x | "
                         f"{_fmt(ms['proxy'] / floor['floor_ms'] if floor else None)}x |")
    for level, row in paper.items():
        lines.append(f"| paper loop | {level} | {row['proxy_ms']:.2f} | {row['base_ms']:.2f} | - | - | "
                     f"{row['proxy_tok_s']:.0f} | {row['base_tok_s']:.0f} | 1.00x | "
                     f"{_fmt(row['proxy_ms'] / floor['floor_ms'] if floor else None)}x |")
    if s.get("ttft"):
        lines += ["", f"TTFT, {s['ttft']['prompt_tokens']}-token prompt (graphs engine): {s['ttft']['ms']:.1f} ms"]
    for name in ("identity, real shapes", "identity fp32", "seeded sampling fp32"):
        if s.get(name):
            value = s[name]
            lines.append(f"{name}: {value['identical']}/{value['sequences']} identical; divergences "
                         f"{value['divergences']}")
    if s.get("host profile"):
        host = s["host profile"]
        lines += ["", f"host profile, graphs engine, {host['rows']} rows: {host['profiled_ms_per_step']} ms per "
                  "proxy step under cProfile", "", "| function | calls per step | own ms | cumulative ms |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {f['function']} | {f['calls_per_step']} | {f['own_ms_per_step']} | {f['cum_ms_per_step']} |"
                  for f in host["top"]]
    if s.get("lora"):
        lora = s["lora"]
        lines += ["", f"LoRA expert, unmerged (weights {lora['weights_gb']['unmerged']:.2f} GB) against merged "
                  f"({lora['weights_gb']['merged']:.2f} GB): " + "; ".join(
                      f"{level} streams {row['ms_per_step']['unmerged']:.2f} against "
                      f"{row['ms_per_step']['merged']:.2f} ms per proxy step ({row['unmerged / merged']:.2f}x)"
                      for level, row in lora["rates"].items())]
    if s.get("fusions"):
        lines += fusions.markdown(s["fusions"])
    if s.get("attention"):
        lines += ["", "attention, µs per call: " + json.dumps(s["attention"])]
    if data["errors"]:
        lines += ["", "errors: " + json.dumps(data["errors"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (the code path only)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer steps")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=None, help="decode steps measured per row (default 48; quick 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--ttft-tokens", type=int, default=TTFT_PROMPT)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--verbose", action="store_true", help="the engine's INFO log (capture time and memory)")
    args = parser.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    steps = args.steps or (16 if args.quick else 48)
    if args.cpu:
        base_shape, pair_shape, dtype, device = BASE_CPU, PAIR_CPU, torch.float32, "cpu"
        executor = "static"  # the graph-safe step, eagerly: the CUDA backend's code path on the CPU
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --cpu", file=sys.stderr)
            return 2
        base_shape, pair_shape = (BASE_QUICK, PAIR_QUICK) if args.quick else (BASE_7B, PAIR_1B)
        dtype, device, executor = torch.bfloat16, "cuda:0", "auto"
    stem = "gpu_cpu_path" if args.cpu else "gpu"
    report = Report(args.out, stem)
    report.data.update({"device": torch.cuda.get_device_name(0) if not args.cpu else "cpu", "dtype": str(dtype),
                        "base": base_shape.name, "pair": pair_shape.name, "steps": steps,
                        "prompt_tokens": args.prompt_tokens, "torch": torch.__version__})
    import transformers

    report.data["transformers"] = transformers.__version__
    tok = tokenizer()
    gen = torch.Generator().manual_seed(0)
    levels = sorted(args.levels)
    prompts = [torch.randint(10, VOCAB, (args.prompt_tokens,), generator=gen).tolist() for _ in range(levels[-1])]
    max_len = max(args.ttft_tokens + 16, args.prompt_tokens + steps + 16)
    started = time.perf_counter()
    models = [build(base_shape, device, dtype, 1, "base", tok), build(pair_shape, device, dtype, 2, "expert", tok),
              build(pair_shape, device, dtype, 3, "anti_expert", tok)]
    print(f"built in {time.perf_counter() - started:.0f}s", flush=True)

    def bandwidth() -> dict:
        rate = copy_bandwidth(device, 1 << (30 if not args.cpu else 24))
        weights = weight_bytes(models)
        return {"copy_tb_s": rate / 1e12, "weights_gb": weights / 1e9, "floor_ms": weights / rate * 1000}

    report.section("bandwidth", bandwidth)

    def paper() -> dict:
        rows = {}
        for level in levels:
            proxy_ms = paper_loop(models, prompts[:level], steps, proxy=True)
            base_ms = paper_loop(models, prompts[:level], steps, proxy=False)
            rows[str(level)] = {"proxy_ms": proxy_ms, "base_ms": base_ms, "proxy_tok_s": level * 1000 / proxy_ms,
                                "base_tok_s": level * 1000 / base_ms}
            print(f"  {level:3d} streams: proxy {proxy_ms:.2f} ms, base {base_ms:.2f} ms per step", flush=True)
        return rows

    report.section("paper loop", paper)
    identity: dict[str, tuple] = {}
    id_prompts = prompts[: levels[-1]]
    for label, eager in (("engine, graphs", False), ("engine, eager", True)):
        holder: dict = {}

        def start(eager: bool = eager, holder: dict = holder) -> dict:
            t0 = time.perf_counter()
            holder["engine"] = make_engine(models, levels[-1], max_len, eager, executor)
            sync()
            return {"start_s": round(time.perf_counter() - t0, 2), "runners": capture_info(holder["engine"])}

        def rates(holder: dict = holder, label: str = label) -> dict:
            info = report.data["sections"].get(f"{label}: start", {})
            return {**info, "rates": engine_rates(holder["engine"], prompts, levels, steps, args.repeats)}

        report.section(f"{label}: start", start)
        if "engine" not in holder:
            continue
        report.section(label, rates)
        if not eager:
            report.section("host profile", lambda holder=holder: host_profile(holder["engine"], prompts))
            report.section("ttft", lambda holder=holder: ttft(holder["engine"], args.ttft_tokens))
        report.section(f"{label}: greedy", lambda holder=holder, label=label: identity.__setitem__(
            label, greedy_run(holder["engine"], id_prompts, 32)) or {"runs": len(id_prompts)})
        del holder["engine"]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if len(identity) == 2:
        def real_identity() -> dict:
            require_graphs(report.data["sections"].get("engine, graphs: start", {}).get("runners", {}), device)
            return compare(identity["engine, graphs"], identity["engine, eager"])

        report.section("identity, real shapes", real_identity)

    gc.collect()

    def fp32_family() -> dict:
        shape = FP32_SHAPE if device != "cpu" else BASE_CPU
        small = [build(shape, device, torch.float32, seed, role, tok)
                 for seed, role in ((11, "base"), (12, "expert"), (13, "anti_expert"))]
        runs: dict[str, tuple] = {}
        sampled: dict[str, tuple] = {}
        for label, eager in (("graphs", False), ("eager", True)):
            engine = make_engine(small, 16, 512, eager, executor)
            if not eager:
                require_graphs(capture_info(engine), device)
            runs[label] = greedy_run(engine, [p[:64] for p in prompts[:16]], 48)
            params = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=32, ignore_eos=True)
            sampled[label] = greedy_run(engine, [p[:40] for p in prompts[:8]], 32, params)
            del engine
        report.data["sections"]["seeded sampling fp32"] = compare(sampled["graphs"], sampled["eager"])
        return compare(runs["graphs"], runs["eager"])

    report.section("identity fp32", fp32_family)
    if device != "cpu":
        report.section("attention", lambda: attention_backends(device, dtype, pair_shape, levels[-1],
                                                               [256, 1024, 4096]))

    report.section("lora", lambda: lora_rates(models, prompts, levels, steps, max_len, executor))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    def fusion_section() -> dict:
        named = {f"base {base_shape.name}": models[0].model, f"pair {pair_shape.name}": models[1].model}
        return {"timings": {name: fusions.time_variants(model, VOCAB, levels, steps=FUSION_STEPS)
                            for name, model in named.items()},
                "profiles": {name: fusions.profile_step(model, VOCAB, levels[-1]) for name, model in named.items()}}

    # Last: the longest section (6 variants x 2 shapes x 2 levels, captured and eager), and the one whose loss
    # to gpu.sh's time box costs least.
    report.section("fusions", fusion_section)
    models.clear()
    report.data["seconds"] = round(time.perf_counter() - started, 1)
    report.save()
    print(markdown(report.data))
    return 0 if not report.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
