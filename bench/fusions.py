"""Each fusion of the static decode step measured on its own (issue 18, item 4), and where a step's time goes.

The static step (``proxy_engine/executor/static_decode.py``) makes four choices to launch fewer kernels than
transformers' layer does. Each variant here puts exactly one of them back to its unfused form (the other three
stay as served), and one puts back all four; every variant is timed on the same model, rows and span, with a
CUDA graph (as served) and eagerly (``--enforce-eager``; on the CPU only this):

- ``separate q/k/v, gate/up``: three and two GEMMs per layer instead of one each, and a ``cat`` to put q and k
  side by side for the joint rotary (``StaticDecoder(fuse=False)``);
- ``RMSNorm op by op``: LlamaRMSNorm's float32 ``pow, mean, add, rsqrt, mul`` instead of ``F.rms_norm``;
- ``rotary on q, k apart``: ``x * cos + swap_halves(x) * sin`` on q and on k, a ``mul`` and an ``add`` each,
  instead of one ``addcmul`` over q and k side by side;
- ``residual add apart``: ``x + h W^T`` instead of ``addmm`` (the add in the GEMM's epilogue).

``profile_step`` lists the kernels of one eager step by device time (host time on the CPU): the profile that
decides what to fuse next. Run by ``bench/gpu_bench.py``'s ``fusions`` section; the CPU path runs in the tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from proxy_engine.executor.cuda_graphs import DecodeGraphs
from proxy_engine.executor.static_cache import SlotPlan, StaticSlotKVCache
from proxy_engine.executor.static_decode import StaticDecoder, decode_backends


class _NormOpByOp(StaticDecoder):
    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()  # transformers' LlamaRMSNorm, op for op
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)


class _RotaryApart(StaticDecoder):
    @staticmethod
    def rotate(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, heads: int) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
        half = qk.shape[-1] // 2

        def one(x: torch.Tensor) -> torch.Tensor:
            return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin

        return one(qk[:, :heads]), one(qk[:, heads:])


class _ResidualApart(StaticDecoder):
    @staticmethod
    def linear_add(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x + F.linear(h, weight, bias)


class _NothingFused(_NormOpByOp, _RotaryApart, _ResidualApart):
    pass


# name -> (decoder class, fuse q/k/v and gate/up)
VARIANTS: dict[str, tuple[type[StaticDecoder], bool]] = {
    "as served (all fused)": (StaticDecoder, True),
    "separate q/k/v, gate/up": (StaticDecoder, False),
    "RMSNorm op by op": (_NormOpByOp, True),
    "rotary on q, k apart": (_RotaryApart, True),
    "residual add apart": (_ResidualApart, True),
    "nothing fused": (_NothingFused, False),
}
SERVED = "as served (all fused)"


def decoders(model: torch.nn.Module, vocab_size: int, capacity: int) -> dict[str, StaticDecoder]:
    """Every variant's decoder over ``model`` (they share its weights: the fused ones are views)."""
    return {name: cls(model, vocab_size, capacity, fuse=fuse) for name, (cls, fuse) in VARIANTS.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call_ms(run: Callable[[], object], calls: int, device: torch.device) -> float:
    run()  # warm
    _sync(device)
    started = time.perf_counter()
    for _ in range(calls):
        run()
    _sync(device)
    return (time.perf_counter() - started) / calls * 1000


def _cache_for(decoder: StaticDecoder, rows: int, span: int) -> StaticSlotKVCache:
    """Static K/V of ``rows`` slots of ``span`` tokens shaped for ``decoder``."""
    return StaticSlotKVCache(len(decoder.layers), SlotPlan(rows, span, 0), decoder.kv_heads, decoder.head_dim,
                             decoder.dtype, decoder.device)


def _eager_step(decoder: StaticDecoder, cache: StaticSlotKVCache, ids_host: torch.Tensor,
                positions_host: torch.Tensor, span: int) -> Callable[[], torch.Tensor]:
    """One eager step of ``decoder`` over ``cache``: the rows' tokens at their positions, under the served SDPA
    backends."""
    device = decoder.device
    ids, positions = ids_host.to(device), positions_host.to(device)
    slots = torch.arange(ids.shape[0], device=device)

    def eager() -> torch.Tensor:
        with decode_backends(device):
            return decoder.step(ids, positions, slots, span, cache)

    return eager


def _runners(decoder: StaticDecoder, cache: StaticSlotKVCache, ids_host: torch.Tensor, positions_host: torch.Tensor,
             span: int) -> dict[str, Callable[[], object]]:
    """One step of ``decoder``, ``eager`` and, on CUDA, ``graph`` (captured now; replayed as served: the inputs
    copied from pinned memory each step)."""
    device = decoder.device
    rows = ids_host.shape[0]
    runners: dict[str, Callable[[], object]] = {"eager": _eager_step(decoder, cache, ids_host, positions_host, span)}
    if device.type == "cuda":
        graphs = DecodeGraphs(lambda i, p, r, s: decoder.step(i, p, r, s, cache), device, rows,
                              lambda: decode_backends(device))
        graphs.capture([rows], [span])
        captured = graphs.find(rows, span)
        runners["graph"] = lambda: graphs.replay(captured, ids_host, positions_host)
    return runners


@torch.inference_mode()
def time_variants(model: torch.nn.Module, vocab_size: int, levels: list[int], span: int = 256, steps: int = 20,
                  rounds: int = 3) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{rows: {variant: {"graph_ms", "eager_ms", "graph vs served", "eager vs served"}}}``: one decode step of
    ``rows`` rows at position ``span // 2`` over a ``span``-column bucket (graphs on CUDA only); the median of
    ``rounds`` rounds that each time every variant in turn (``steps`` steps each), so drift hits all alike."""
    device = model.lm_head.weight.device
    variants = decoders(model, vocab_size, span)
    cache = _cache_for(variants[SERVED], max(levels), span)
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for rows in levels:
        ids = torch.randint(10, vocab_size, (rows,))
        positions = torch.full((rows,), span // 2, dtype=torch.long)
        runners = {name: _runners(decoder, cache, ids, positions, span) for name, decoder in variants.items()}
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for name, modes in runners.items():
                for mode, run in modes.items():
                    samples.setdefault((name, mode), []).append(_per_call_ms(run, steps, device))
        table = {name: {f"{mode}_ms": statistics.median(samples[(name, mode)]) if (name, mode) in samples else None
                        for mode in ("graph", "eager")} for name in variants}
        served = table[SERVED]
        for row in table.values():
            for mode in ("graph", "eager"):
                mine, theirs = row[f"{mode}_ms"], served[f"{mode}_ms"]
                row[f"{mode} vs served"] = None if mine is None or not theirs else round(mine / theirs, 3)
        results[str(rows)] = table
        del runners  # the graphs, before the next level's
    return results


@torch.inference_mode()
def profile_step(model: torch.nn.Module, vocab_size: int, rows: int, span: int = 256, top: int = 15) -> dict:
    """The kernels of one eager static step (``rows`` rows, a ``span`` bucket) by time: device time on CUDA,
    host time on the CPU; per step, with the number of launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = model.lm_head.weight.device
    decoder = StaticDecoder(model, vocab_size, span)
    step = _eager_step(decoder, _cache_for(decoder, rows, span), torch.randint(10, vocab_size, (rows,)),
                       torch.full((rows,), span // 2, dtype=torch.long), span)
    cuda = device.type == "cuda"
    for _ in range(2):
        step()
    _sync(device)
    steps = 3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall_ms = (time.perf_counter() - started) / steps * 1000
    events = prof.key_averages()
    if cuda:  # the kernels themselves (an aten op also carries its kernels' device time: counted once here)
        timed = [(e.key, e.count, e.self_device_time_total) for e in events
                 if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:  # the CPU: aten ops by their own host time
        timed = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.key.startswith("aten::")]
    timed.sort(key=lambda item: item[2], reverse=True)
    total_us = sum(t for _, _, t in timed)
    return {
        "rows": rows, "span": span, "clock": "device" if cuda else "host",
        "step_wall_ms_profiled": round(wall_ms, 3),
        "kernel_ms_per_step": round(total_us / steps / 1000, 3),
        "launches_per_step": sum(count for _, count, _ in timed) // steps,
        "top": [{"name": name[:90], "per_step": count // steps, "ms_per_step": round(us / steps / 1000, 4),
                 "share": round(us / total_us, 3) if total_us else 0.0} for name, count, us in timed[:top]],
    }


def markdown(section: dict) -> list[str]:
    """Lines of the bench report for the ``fusions`` section."""
    lines: list[str] = []
    for model, by_rows in (section.get("timings") or {}).items():
        lines += ["", f"fusions, {model}: ms per decode step, one fusion undone at a time (span 256)", "",
                  "| variant | rows | graph ms | vs served | eager ms | vs served |", "|---|---:|---:|---:|---:|---:|"]
        for rows, table in by_rows.items():
            for name, row in table.items():
                graph = "-" if row["graph_ms"] is None else f"{row['graph_ms']:.3f}"
                lines.append(f"| {name} | {rows} | {graph} | {row['graph vs served'] or '-'} | "
                             f"{row['eager_ms']:.3f} | {row['eager vs served']} |")
    for model, prof in (section.get("profiles") or {}).items():
        lines += ["", f"profile, {model}, one eager step of {prof['rows']} rows: {prof['kernel_ms_per_step']} ms of "
                  f"{prof['clock']} time in {prof['launches_per_step']} launches; wall {prof['step_wall_ms_profiled']}"
                  f" ms (profiled)", "", "| kernel | per step | ms per step | share |", "|---|---:|---:|---:|"]
        lines += [f"| {k['name']} | {k['per_step']} | {k['ms_per_step']} | {k['share']:.1%} |" for k in prof["top"]]
    return lines
