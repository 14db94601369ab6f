"""The CUDA backend's decode step, run on the CPU: static buffers and their row bookkeeping, the graph-safe step
against today's fast path (logits and tokens), the replay path's padding, and the eager fallbacks."""

from __future__ import annotations

import random

import pytest
import torch

from proxy_engine.config import RuntimeConfig
from proxy_engine.executor import buckets
from proxy_engine.executor.cuda_graphs import CapturedStep, DecodeGraphs
from proxy_engine.executor.static_cache import SlotPlan, StaticSlotKVCache, plan_slots
from proxy_engine.executor.static_decode import static_unsupported_reason
from proxy_engine.runner import ModelRunner
from tests.engine.test_kv_cache import MIXTURE_KINDS, _join, _random_model

STATIC = RuntimeConfig(decode_executor="static")


def _pair(kind: str, plan: SlotPlan) -> tuple[ModelRunner, ModelRunner]:
    model = _random_model(kind)
    return ModelRunner(model, 80, 0, kind), ModelRunner(model, 80, 0, kind, runtime=STATIC, slot_plan=plan)


def test_plan_slots_fits_the_budget_or_says_none():
    assert plan_slots(10, 8, 100, None) == SlotPlan(8, 100, 8000)
    assert plan_slots(10, 8, 100, 3500) == SlotPlan(3, 100, 3000)  # memory for three full-length rows
    assert plan_slots(10, 8, 100, 999) is None


def test_static_buffers_are_allocated_once_and_kept():
    cache = StaticSlotKVCache(2, SlotPlan(4, 32, 0), 2, 8, torch.float32, torch.device("cpu"))
    buffers = [layer.k_buf for layer in cache.layers]
    assert cache.slots == 4 and cache.capacity == 32 and buffers[0].shape == (4, 2, 32, 8)
    cache._reserve(buffers[0], buffers[0], 4, 32)  # within the plan: nothing moves
    cache.state.lengths = [3, 5]
    cache.clear()
    assert cache.num_rows == 0 and [layer.k_buf for layer in cache.layers] == buffers and cache.generation == 0
    cache._reserve(buffers[0], buffers[0], 6, 10)  # past the plan: regrown (and graphs over the old buffers are stale)
    assert cache.slots >= 6 and cache.generation == 1


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo2", "olmo3",
                                  "granite", *MIXTURE_KINDS])
def test_static_step_gives_the_fast_paths_logits_as_rows_join_and_leave(kind, monkeypatch):
    monkeypatch.setattr(buckets, "MIN_SPAN", 8)  # several span buckets within a few steps
    fast, static = _pair(kind, SlotPlan(8, 64, 0))
    assert fast.executor == "fast" and static.executor == "static"
    assert static._static.span_buckets == [8, 16, 32, 64] and static._static.batch_buckets == [1, 2, 4, 8]
    rng = random.Random(1)
    next_id = 0
    for step in range(24):
        if step % 6 == 0:
            prompts = [[rng.randrange(3, 80) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 3))]
            ids = list(range(next_id, next_id + len(prompts)))
            next_id += len(prompts)
            for runner in (fast, static):
                _join(runner, ids, prompts)
        if step % 4 == 3 and fast.num_rows > 1:
            keep = rng.sample(fast.seq_ids, fast.num_rows - 1)
            for runner in (fast, static):
                runner.keep_rows(keep)
        assert fast.seq_ids == static.seq_ids and fast.cache.lengths == static.cache.lengths
        tokens = torch.tensor([rng.randrange(3, 80) for _ in fast.seq_ids])
        torch.testing.assert_close(static.decode(tokens), fast.decode(tokens), atol=1e-5, rtol=1e-5)
    static.keep_rows([])
    assert static.num_rows == 0 and static.kv_bytes() > 0  # the buffers stay for the next batch


def test_rows_past_the_slots_regrow_and_decode_eagerly():
    fast, static = _pair("llama", SlotPlan(2, 64, 0))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    for runner in (fast, static):
        _join(runner, [0, 1, 2], prompts)
    assert static._static.buckets(3, 5)[0] is None  # no batch bucket holds three rows
    for step in range(3):
        tokens = torch.tensor([20 + step, 21, 22])
        torch.testing.assert_close(static.decode(tokens), fast.decode(tokens), atol=1e-5, rtol=1e-5)
    assert static.cache.generation == 1 and static.cache.slots >= 3


class _EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: replay runs the same step on the same static inputs."""

    def __init__(self, graphs: DecodeGraphs, rows: int, span: int, out: torch.Tensor) -> None:
        self.graphs, self.rows, self.span, self.out, self.replays = graphs, rows, span, out, 0

    def replay(self) -> None:
        self.replays += 1
        self.out.copy_(self.graphs._run(self.rows, self.span))


def _fake_capture(executor, pairs: list[tuple[int, int]]) -> dict:
    graphs = DecodeGraphs(executor._graph_step, executor.device, executor.cache.slots, lambda: torch.no_grad())
    fakes = {}
    for rows, span in pairs:
        out = torch.zeros(rows, 80)
        fakes[(rows, span)] = _EagerGraph(graphs, rows, span, out)
        graphs.captured[(rows, span)] = CapturedStep(rows, span, fakes[(rows, span)], out)
    executor.graphs = graphs
    return fakes


def test_replay_pads_rows_to_the_bucket_and_falls_back_past_it(monkeypatch):
    """The replay path (static inputs, rows padded into free slots) gives the eager logits; a bucket with no
    graph (past the memory budget) decodes eagerly; buffers that moved drop every graph."""
    monkeypatch.setattr(buckets, "MIN_SPAN", 16)
    fast, static = _pair("llama", SlotPlan(4, 64, 0))
    fakes = _fake_capture(static._static, [(4, 16), (2, 16), (4, 32)])
    for runner in (fast, static):
        _join(runner, [0, 1, 2], [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]])
    for step in range(14):  # three rows: the 4-row bucket, spans 16 then 32
        tokens = torch.tensor([20 + step, 30, 40])
        torch.testing.assert_close(static.decode(tokens), fast.decode(tokens), atol=1e-5, rtol=1e-5)
    assert fakes[(4, 16)].replays == 11 and fakes[(4, 32)].replays == 3  # widths 6..16, then 17..19
    for runner in (fast, static):
        runner.keep_rows([0])
    tokens = torch.tensor([7])
    torch.testing.assert_close(static.decode(tokens), fast.decode(tokens), atol=1e-5, rtol=1e-5)  # (1, 32): eager
    assert sum(f.replays for f in fakes.values()) == 14
    for runner in (fast, static):
        _join(runner, [3, 4, 5, 6], [[1, 2]] * 4)  # five rows: the buffers regrow, the graphs go
    tokens = torch.tensor([9, 8, 7, 6, 5])
    torch.testing.assert_close(static.decode(tokens), fast.decode(tokens), atol=1e-5, rtol=1e-5)
    assert static._static.graphs.captured == {} and not static._static.graphed


def test_length_dependent_rope_is_not_static():
    model = _random_model("llama")
    assert static_unsupported_reason(model) is None
    model.model.rotary_emb.rope_type = "dynamic"
    assert "dynamic" in static_unsupported_reason(model)
    runner = ModelRunner(model, 80, 0, "llama", runtime=STATIC, slot_plan=SlotPlan(2, 64, 0))
    assert runner.executor == "fast"  # falls back along static -> fast -> transformers


def test_experts_that_read_the_routing_back_are_not_static():
    """transformers' eager experts loop over the experts hit (a host read each step): the fast step then."""
    model = _random_model("mixtral")
    assert model.config._experts_implementation == "grouped_mm" and static_unsupported_reason(model) is None
    model.config._experts_implementation = "eager"
    assert "experts implementation eager" in static_unsupported_reason(model)
    runner = ModelRunner(model, 80, 0, "mixtral", runtime=STATIC, slot_plan=SlotPlan(2, 64, 0))
    assert runner.executor == "fast"


def test_fused_weights_are_views_and_prefill_still_reads_them():
    model = _random_model("qwen2")
    with torch.no_grad():
        before = model(torch.tensor([[5, 6, 7, 8]])).logits
    ModelRunner(model, 80, 0, "qwen2", runtime=STATIC, slot_plan=SlotPlan(2, 64, 0))
    attn = model.model.layers[0].self_attn
    fused, bias = attn._proxy_fused_qkv
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr() and bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([[5, 6, 7, 8]])).logits, before)
    ModelRunner(model, 80, 0, "qwen2", runtime=STATIC, slot_plan=SlotPlan(2, 64, 0))  # a second engine: same tensors
    assert attn._proxy_fused_qkv[0] is fused


def test_models_sharing_a_gpu_split_its_free_memory(monkeypatch):
    from proxy_engine.executor import selection

    monkeypatch.setattr(selection, "free_bytes",
                        lambda device, utilization=None: None if device.type == "cpu" else 10_000)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    # The engine's budget at its limits: 4 rows x 100 tokens; 8000 of the 10000 free bytes may hold static K/V.
    plans = selection.static_kv_plans([10, 5, 5], [gpu, gpu, gpu], 4, [100, 100, 100], fraction=0.8)
    assert [p.slots for p in plans] == [4, 4, 4]  # 4000 + 2000 + 2000 fit
    plans = selection.static_kv_plans([20, 10, 10], [gpu, gpu, gpu], 4, [100, 100, 100], fraction=0.8)
    # 16000 wanted, 8000 there: two full-length rows each, and the running batch is capped at two.
    assert [p.slots for p in plans] == [2, 2, 2] and [p.nbytes for p in plans] == [4000, 2000, 2000]
    assert selection.running_cap(plans, 4) == 2
    plans = selection.static_kv_plans([20, 10, 10], [gpu, cpu, cpu], 4, [100, 100, 100], fraction=0.8)
    assert [p.slots for p in plans] == [4, 4, 4]  # alone on the GPU: 8000 bytes for its 8000
    plans = selection.static_kv_plans([40, 10, 10], [gpu, cpu, cpu], 4, [100, 100, 100], fraction=0.8)
    # The GPU holds two of the base's rows: the pair on the CPU needs no more than the batch can hold.
    assert [(p.slots, p.nbytes) for p in plans] == [(2, 8000), (2, 2000), (2, 2000)]
    plans = selection.static_kv_plans([20, 10, 10], [gpu, gpu, gpu], 4, [100, 100, 100], fraction=0.8,
                                      static=[True, False, False])
    # The pair decodes on another executor: no buffers for it, and the base has the GPU's 8000 bytes alone.
    assert plans[1:] == [None, None] and plans[0].slots == 4
    plans = selection.static_kv_plans([100, 10, 10], [gpu, cpu, cpu], 4, [100, 100, 100], fraction=0.8)
    # Not one full-length row of the base fits: it keeps the growable cache (the fast path), and caps nothing.
    assert plans[0] is None and [p.slots for p in plans[1:]] == [4, 4] and selection.running_cap(plans, 4) == 4


def test_gpu_memory_utilization_counts_what_is_in_use_against_its_share(monkeypatch):
    """vLLM's --gpu-memory-utilization: of a 40,000-byte GPU with 10,000 free (30,000 in use: weights, other
    processes), 0.9 leaves 6,000 bytes to fill and 0.5 none; unset, all 10,000 free bytes count."""
    from proxy_engine import device_memory
    from proxy_engine.executor import selection

    monkeypatch.setattr(device_memory, "free_bytes", lambda device: 10_000)
    monkeypatch.setattr(device_memory, "total_bytes", lambda device: 40_000)
    gpu = torch.device("cuda", 0)
    assert [device_memory.usable_bytes(gpu, u) for u in (None, 1.0, 0.9, 0.5)] == [10_000, 10_000, 6_000, 0]
    assert device_memory.usable_bytes(torch.device("cpu"), 0.5) == 10_000  # a GPU's share: the CPU is unbounded
    want = dict(bytes_per_token=[10, 0, 0], devices=[gpu, gpu, gpu], max_rows=8, max_lens=[100, 100, 100],
                fraction=0.8, static=[True, False, False])
    assert selection.static_kv_plans(**want)[0].slots == 8  # 8,000 of 10,000 free: eight rows of 1,000
    assert selection.static_kv_plans(**want, utilization=0.9)[0].slots == 4  # 0.8 x 6,000 holds four
    assert selection.static_kv_plans(**want, utilization=0.5)[0] is None  # nothing left: no static buffers
