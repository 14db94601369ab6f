"""What a CUDA graph needs of the decode step, checked on the CPU: no value read back to the host, shapes that
depend only on (rows, span), and the capture procedure (warm-up on a side stream, one shared pool, largest shapes
first, the memory budget) driven through stand-ins for ``torch.cuda``'s graph API."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from proxy_engine.executor import cuda_graphs
from proxy_engine.executor.cuda_graphs import DecodeGraphs
from proxy_engine.executor.static_cache import SlotPlan
from proxy_engine.executor.static_executor import StaticExecutor
from tests.engine.test_kv_cache import _random_model

# Tensor methods that read a device value on the host (a sync, and a capture error, on CUDA).
_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
               "unique", "masked_select", "any", "all"}


class _NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _HOST_READS:
            raise AssertionError(f"the decode step reads a value on the host: {name}")
        return func(*args, **(kwargs or {}))


class _Shapes(TorchDispatchMode):
    """Records every aten op the step runs, with its output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.trace: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.trace.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def _executor(kind: str = "qwen2") -> StaticExecutor:
    return StaticExecutor(_random_model(kind), 80, kind, SlotPlan(4, 64, 0), eager=True, min_span=16)


def _step(executor: StaticExecutor, rows: int, span: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 80, (rows,), generator=generator)
    positions = torch.randint(0, span, (rows,), generator=generator)
    return executor.decoder.step(ids, positions, torch.arange(rows), span, executor.cache)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral", "qwen2_moe"])
def test_the_step_reads_nothing_back_to_the_host(kind):
    executor = _executor(kind)
    with torch.inference_mode(), _NoHostReads():
        assert _step(executor, 4, 32, 0).shape == (4, 80)
        assert _step(executor, 1, 32, 0).shape == (1, 80)  # routed: grouped_mm over one row and over four


@pytest.mark.parametrize(("kind", "rows"), [("qwen2", 4), ("mixtral", 1), ("mixtral", 4)])
def test_the_steps_ops_and_shapes_depend_only_on_rows_and_span(kind, rows):
    executor = _executor(kind)
    traces = []
    for seed in (0, 1):  # other tokens, other positions (and experts chosen): the same ops on the same shapes
        with torch.inference_mode(), _Shapes() as shapes:
            _step(executor, rows, 32, seed)
        traces.append(shapes.trace)
    assert traces[0] == traces[1] and len(traces[0]) > 20


class _FakeStream:
    def __init__(self, device=None) -> None:
        self.waited = 0

    def wait_stream(self, other) -> None:
        self.waited += 1


class _FakeGraph:
    def __init__(self) -> None:
        self.pool = None

    def replay(self) -> None:
        raise AssertionError("not replayed in this test")


class _FakeCuda:
    """The parts of ``torch.cuda`` the capture uses; pool memory grows by ``per_graph`` bytes per capture, and
    ``cached`` bytes sit in the allocator's cache, unused, until ``empty_cache``."""

    def __init__(self, per_graph: int, cached: int = 0) -> None:
        self.per_graph, self.reserved, self.events = per_graph, cached, []
        self.cached = cached
        self.pools: list[object] = []
        self.streams: list[tuple[object, object]] = []  # (warm-up, capture) stream of each capture
        self._current_warm_up = None

    @property
    def pool(self) -> object:
        return self.pools[-1]

    def _new_pool(self) -> object:
        self.pools.append(object())
        return self.pools[-1]

    def _empty_cache(self) -> None:
        self.reserved -= self.cached
        self.cached = 0

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "device", lambda device: nullcontext())
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(cuda, "graph_pool_handle", self._new_pool)
        monkeypatch.setattr(cuda, "empty_cache", self._empty_cache)
        monkeypatch.setattr(cuda, "current_device", lambda: 0)
        monkeypatch.setattr(cuda, "Stream", _FakeStream)
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: _FakeStream())
        monkeypatch.setattr(cuda, "CUDAGraph", _FakeGraph)
        monkeypatch.setattr(cuda, "stream", self._stream)
        monkeypatch.setattr(cuda, "graph", self._graph)
        monkeypatch.setattr(cuda_graphs, "_POOLS", {})
        monkeypatch.setattr(cuda_graphs, "_STREAMS", {})

    @contextmanager
    def _stream(self, stream):
        self.events.append("warm-up")
        self._current_warm_up = stream
        yield

    @contextmanager
    def _graph(self, graph, pool=None, stream=None):
        assert pool is self.pool  # every capture shares the device's newest pool
        self.events.append("capture")
        self.streams.append((self._current_warm_up, stream))
        yield
        self.reserved += self.per_graph


def test_capture_warms_up_then_captures_largest_first_within_the_budget(monkeypatch):
    fake = _FakeCuda(per_graph=100)
    fake.install(monkeypatch)
    executor = _executor()
    graphs = DecodeGraphs(executor._graph_step, executor.device, 4, lambda: nullcontext())
    with torch.inference_mode():
        report = graphs.capture([1, 2, 4], [16, 32, 64], memory_budget=450)
    assert fake.events[:4] == ["warm-up", "capture", "warm-up", "capture"]
    # Largest span first, largest batch first; past 450 bytes of pool growth the rest stay eager.
    assert list(graphs.captured) == [(4, 64), (2, 64), (1, 64), (4, 32), (2, 32)]
    assert report.graphs == 5 and report.pool_bytes == 500 and report.skipped == [(1, 32), (4, 16), (2, 16), (1, 16)]
    assert all(c.logits.shape == (rows, 80) for (rows, _), c in graphs.captured.items())
    assert set(graphs.inputs) == {1, 2, 4}  # one static input buffer per batch bucket, shared by its spans
    # One warm-up stream and one capture stream for the device, made once (not the class-wide default capture
    # stream, which lives on whichever device was current first).
    assert len(set(fake.streams)) == 1 and None not in fake.streams[0]
    assert fake.streams[0][0] is not fake.streams[0][1]


def test_cache_the_allocator_held_before_the_captures_is_not_counted_as_negative_growth(monkeypatch):
    fake = _FakeCuda(per_graph=100, cached=8 << 30)  # the weights that fusing q/k/v released, cached
    fake.install(monkeypatch)
    executor = _executor()
    graphs = DecodeGraphs(executor._graph_step, executor.device, 4, lambda: nullcontext())
    with torch.inference_mode():
        report = graphs.capture([1, 2], [16], memory_budget=1 << 30)
    assert report.pool_bytes == 200 and report.graphs == 2


def test_a_pool_is_shared_while_a_graph_in_it_lives_and_a_new_one_made_after(monkeypatch):
    import gc

    fake = _FakeCuda(per_graph=1)
    fake.install(monkeypatch)
    executor = _executor()
    first = DecodeGraphs(executor._graph_step, executor.device, 4, lambda: nullcontext())
    second = DecodeGraphs(executor._graph_step, executor.device, 4, lambda: nullcontext())
    with torch.inference_mode():
        first.capture([1], [16])
        second.capture([2], [16])  # another model of the same engine: the same pool
        assert len(fake.pools) == 1
        first.clear()
        second.clear()
        gc.collect()
        # Every graph of that pool is gone: the allocator may hold the pool with blocks in it (cuBLAS's workspace),
        # and joining it would fail its use-count assert, so the next capture (a new engine) starts a new pool.
        third = DecodeGraphs(executor._graph_step, executor.device, 4, lambda: nullcontext())
        third.capture([1], [16])
    assert len(fake.pools) == 2


def test_a_failed_capture_leaves_the_model_decoding_eagerly(monkeypatch):
    fake = _FakeCuda(per_graph=1)
    fake.install(monkeypatch)

    def broken(graph, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", broken)
    executor = _executor()
    executor._capture()
    assert executor.graphs is None and not executor.graphed


def test_the_attention_mask_has_strides_the_memory_efficient_kernel_reads_in_place(monkeypatch):
    """A span that is not a multiple of 8 (a bucket as long as an odd max_model_len) still gives a mask whose
    strides are multiples of 8: else SDPA pads a copy of it in every layer of every step."""
    import torch.nn.functional as F

    from proxy_engine.executor import static_decode

    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append((tuple(attn_mask.shape), attn_mask.stride()))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(static_decode.F, "scaled_dot_product_attention", spy)
    executor = _executor()
    with torch.inference_mode():
        _step(executor, 3, 20, 0)
    assert seen and all(shape == (3, 1, 1, 20) for shape, _ in seen)
    assert all(stride[-1] == 1 and all(s % static_decode.MASK_ALIGNMENT == 0 for s in stride[:-1])
               for _, stride in seen)


def test_a_lora_adds_only_fixed_shape_ops_that_read_nothing_back():
    """The terms of a LoRA served unmerged (lora.py) are captured with the step: the same two checks."""
    from proxy_engine.lora import LoraAdapter, LoraTerm

    model = _random_model("llama")
    generator = torch.Generator().manual_seed(0)
    terms = {}
    for layer in model.model.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.up_proj,
                       layer.mlp.down_proj):
            out_features, in_features = module.weight.shape
            terms[module] = LoraTerm(torch.randn(2, in_features, generator=generator),
                                     torch.randn(out_features, 2, generator=generator))
    executor = StaticExecutor(model, 80, "llama", SlotPlan(4, 64, 0), eager=True, min_span=16,
                              adapter=LoraAdapter("random", terms))
    plain = StaticExecutor(_random_model("llama"), 80, "llama", SlotPlan(4, 64, 0), eager=True, min_span=16)
    traces = []
    for seed in (0, 1):
        with torch.inference_mode(), _NoHostReads(), _Shapes() as shapes:
            _step(executor, 4, 32, seed)
        traces.append(shapes.trace)
    assert traces[0] == traces[1]
    with torch.inference_mode(), _Shapes() as shapes:
        _step(plain, 4, 32, 0)
    assert len(traces[0]) > len(shapes.trace)  # the terms' GEMMs and adds are in it
