"""Expert pairs added to and removed from a running engine (``ProxyEngine.add_pair`` / ``remove_pair``: vLLM's runtime
LoRA loading). A pair added while serving must serve exactly what the same pair configured at start-up serves (it
out of the default combination, under its name), leave every other model id as it was, and, once removed, let its
running requests finish as they would have, refuse new ones, and free its adapter."""

from __future__ import annotations

import pytest
import torch

from proxy_engine.config import EngineConfig, ExpertPairConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.loader import load_models
from proxy_engine.request import PairNotFoundError, PromptInput, SamplingParams, Serves, Target
from tests.engine.conftest import run_to_end, submit
from tests.engine.test_adapter import _save_lora

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PROMPTS = ["Hello there", "Once upon a time, in a land far away"]
LORA_PAIR = Target(Serves.PROXY, 1)


@pytest.fixture(scope="module")
def lora(tiny_family, tmp_path_factory):
    return _save_lora(tiny_family.anti_expert, tmp_path_factory.mktemp("runtime-lora"))


def _configured(family, extra: list[dict] = (), **runtime) -> EngineConfig:
    first = {"expert": {"path": str(family.expert)}, "anti_expert": {"path": str(family.anti_expert)}, "alpha": 1.5}
    return EngineConfig(base={"path": str(family.base)}, experts=[first, *extra], runtime=runtime)


def _lora_pair(family, lora, name: str = "lora", **fields) -> dict:
    return {"expert": {"path": str(lora)}, "anti_expert": {"path": str(family.anti_expert)}, "name": name,
            **fields}


def _engine(config: EngineConfig) -> ProxyEngine:
    return ProxyEngine(load_models(config), config)


def _add(engine: ProxyEngine, pair: dict) -> list[ExpertPairConfig]:
    future = engine.add_pair(ExpertPairConfig(**pair))
    engine.step()  # the step thread takes it up
    return future.result(timeout=0)


def _serve(engine: ProxyEngine, target: Target, prefix: str = "r", **params) -> dict:
    for k, prompt in enumerate(PROMPTS):
        submit(engine, f"{prefix}{k}", prompt, target, max_tokens=8, ignore_eos=True, **params)
    return {key: (entry["tokens"], entry["text"]) for key, entry in run_to_end(engine).items()}


@pytest.fixture(scope="module")
def reference(tiny_family, lora):
    """The same pair configured at start-up, out of the default combination."""
    return _engine(_configured(tiny_family, [_lora_pair(tiny_family, lora, in_default=False)]))


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 0.9, "seed": 11}])
def test_an_added_pair_serves_what_the_configured_pair_serves(tiny_family, lora, reference, params):
    engine = _engine(_configured(tiny_family))
    default_before = _serve(engine, Target.PROXY, **params)
    pairs = _add(engine, _lora_pair(tiny_family, lora))
    assert [p.name for p in pairs] == [None, "lora"] and not pairs[1].in_default
    assert engine.config.experts[1].expert.adapter == str(lora)
    # One copy of the small model: the adapter runs over the anti-expert's module.
    assert engine.models[-1].model is engine.models[2].model and engine.models[-1].adapter is not None
    for target in (LORA_PAIR, Target(Serves.EXPERT, 1)):
        assert _serve(engine, target, **params) == _serve(reference, target, **params)
    assert _serve(engine, Target.PROXY, **params) == default_before  # the default combination is untouched
    assert _serve(engine, Target.PROXY, **params) == _serve(reference, Target.PROXY, **params)


def test_removing_a_pair_lets_its_requests_finish_then_frees_it(tiny_family, lora, reference):
    engine = _engine(_configured(tiny_family))
    anti_module = engine.models[2].model
    hooks_before = sum(len(m._forward_hooks) for m in anti_module.modules())
    _add(engine, _lora_pair(tiny_family, lora))
    index = len(engine.runners) - 1
    expected = _serve(reference, LORA_PAIR, temperature=0)
    for k, prompt in enumerate(PROMPTS):
        submit(engine, f"r{k}", prompt, LORA_PAIR, max_tokens=8, ignore_eos=True, temperature=0)
    first = {(o.request_id, o.index): (o.new_token_ids, o.text_delta) for o in engine.step()}  # a token each
    assert len(first) == len(PROMPTS)
    future = engine.remove_pair("lora")
    results = run_to_end(engine)
    assert future.result(timeout=0)[1].name is None
    for key, entry in results.items():  # both finished as the configured pair would have served them
        assert (first[key][0] + entry["tokens"], first[key][1] + entry["text"]) == expected[key]
    assert [p.name for p in engine.config.experts] == [None, None]
    assert engine.runners[index].adapter is None and engine.models[index].model is None
    assert sum(len(m._forward_hooks) for m in anti_module.modules()) == hooks_before
    with pytest.raises(PairNotFoundError, match="has been removed"):  # the server's 404
        submit(engine, "late", "Hello", LORA_PAIR, max_tokens=2)
    # Loaded again under the same name: a new pair and a new model (the freed one is never shared again).
    pairs = _add(engine, _lora_pair(tiny_family, lora))
    assert [p.name for p in pairs] == [None, None, "lora"] and len(engine.runners) == index + 2
    again = {key: value for key, value in _serve(engine, Target(Serves.PROXY, 2), temperature=0).items()}
    assert again == expected


def test_a_request_rendered_before_the_pair_was_freed_is_refused_not_run_without_it(tiny_family, lora):
    engine = _engine(_configured(tiny_family))
    _add(engine, _lora_pair(tiny_family, lora))
    stale = engine.make_sequences("stale", PromptInput(text="Hello"), SamplingParams(max_tokens=2), LORA_PAIR)
    engine.remove_pair("lora")
    run_to_end(engine)
    with pytest.raises(PairNotFoundError, match="removed"):
        engine.add(stale)


def test_pairs_that_cannot_be_added_or_removed_say_why(tiny_family, lora, tmp_path):
    engine = _engine(_configured(tiny_family))
    anti = {"path": str(tiny_family.anti_expert)}
    cases = [
        ({"expert": {"path": str(lora)}, "anti_expert": anti}, "needs a name"),
        ({"expert": {"path": str(tiny_family.expert)}, "anti_expert": anti, "name": "full"}, "not a PEFT adapter"),
        ({"expert": {"path": str(lora)}, "anti_expert": {**anti, "dtype": "bfloat16"}, "name": "x"},
         "not a checkpoint this server runs"),
        ({"expert": {"path": str(tmp_path / "missing")}, "anti_expert": anti, "name": "x"}, "not a PEFT adapter"),
    ]
    for pair, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add_pair(ExpertPairConfig(**pair))
    _add(engine, _lora_pair(tiny_family, lora))
    with pytest.raises(ValueError, match="already served"):
        engine.add_pair(ExpertPairConfig(**_lora_pair(tiny_family, lora)))
    with pytest.raises(PairNotFoundError):
        engine.remove_pair("nope")
    named = _engine(EngineConfig(base={"path": str(tiny_family.base)}, experts=[
        {"expert": {"path": str(tiny_family.expert)}, "anti_expert": anti, "name": "fixed"},
        {"expert": {"path": str(lora)}, "anti_expert": anti, "name": "aside", "in_default": False}]))
    with pytest.raises(ValueError, match="steers the default model"):
        named.remove_pair("fixed")
    named.remove_pair("aside")  # configured, but served under its name alone (vLLM's --lora-modules)
    named.step()
    assert [p.name for p in named.config.experts] == ["fixed", None] and named.runners[-1].adapter is None
    assert len(engine.runners) == 4  # nothing half-added by the refusals


def test_a_pair_out_of_the_default_combination_needs_a_name_and_takes_no_alpha_there(tiny_family, lora):
    with pytest.raises(ValueError, match="give it a name"):
        _configured(tiny_family, [{**_lora_pair(tiny_family, lora), "name": None, "in_default": False}])
    config = _configured(tiny_family, [_lora_pair(tiny_family, lora, in_default=False)])
    assert config.default_pairs == [0]
    # A list alpha has one value per pair of the default combination.
    assert SamplingParams(alpha=[2.0]).resolve_alphas(config.default_alphas, None, config.default_pairs) == [2.0, 0.0]
    assert SamplingParams(alpha=3.0).resolve_alphas(config.default_alphas, None, config.default_pairs) == [3.0, 0.0]
    assert SamplingParams().resolve_alphas(config.default_alphas, 1, config.default_pairs) == [0.0, 1.0]
    with pytest.raises(ValueError, match="combines 1 expert pairs"):
        SamplingParams(alpha=[1.0, 1.0]).resolve_alphas(config.default_alphas, None, config.default_pairs)


@pytest.mark.parametrize("in_process", [False, True])
def test_through_the_async_engines(tiny_family, lora, reference, in_process):
    """The same calls through the engine in its own process (the server's default) and in this one."""
    import asyncio

    from proxy_engine.async_engine import AsyncEngine
    from proxy_engine.engine_process import EngineProcess

    async def run() -> tuple[dict, list]:
        engine = (AsyncEngine if in_process else EngineProcess)(_configured(tiny_family))
        await engine.start()
        try:
            pairs = await engine.add_pair(ExpertPairConfig(**_lora_pair(tiny_family, lora)))
            texts = {}
            for k, prompt in enumerate(PROMPTS):
                stream = await engine.add_request(f"p{k}", PromptInput(text=prompt),
                                                  SamplingParams(max_tokens=8, ignore_eos=True, temperature=0),
                                                  LORA_PAIR)
                texts[(f"r{k}", 0)] = "".join([output.text_delta async for output in stream])
            removed = await engine.remove_pair("lora")
            with pytest.raises(PairNotFoundError):
                await engine.remove_pair("lora")
            return texts, [pairs, removed]
        finally:
            await engine.shutdown()

    texts, (pairs, removed) = asyncio.run(run())
    assert pairs[1].name == "lora" and removed[1].name is None
    assert texts == {key: text for key, (_, text) in _serve(reference, LORA_PAIR, temperature=0).items()}


def test_no_leftover_tensors_on_the_anti_expert(tiny_family, lora):
    """The adapter's terms leave with it: the anti-expert's fast step forgets them."""
    engine = _engine(_configured(tiny_family))
    _add(engine, _lora_pair(tiny_family, lora))
    index = len(engine.runners) - 1
    fast = engine.runners[index].fast
    assert fast is not None and fast is engine.runners[2].fast  # one fast step over the anti-expert's module
    _serve(engine, LORA_PAIR, temperature=0)
    assert fast._lora
    engine.remove_pair("lora")
    engine.step()
    assert not fast._lora
    assert torch.is_tensor(engine.runners[2].model.get_input_embeddings().weight)


@pytest.mark.parametrize("lora_mode", ["auto", "unmerged"])
def test_under_the_static_step(tiny_family, lora, lora_mode):
    """The static (CUDA-graph) step, run eagerly as on the CPU: ``auto`` merges the adapter into a copy there, which
    the removal frees; ``unmerged`` adds its terms in a step of its own over the anti-expert's weights."""
    runtime = {"decode_executor": "static", "lora_mode": lora_mode}
    engine = _engine(_configured(tiny_family, **runtime))
    reference = _engine(_configured(tiny_family, [_lora_pair(tiny_family, lora, in_default=False)], **runtime))
    _add(engine, _lora_pair(tiny_family, lora))
    added = engine.runners[-1]
    assert added.executor == "static"
    assert (engine.models[-1].model is engine.models[2].model) == (lora_mode == "unmerged")
    assert _serve(engine, LORA_PAIR, temperature=0) == _serve(reference, LORA_PAIR, temperature=0)
    engine.remove_pair("lora")
    engine.step()
    assert added.model is None and added._static is None


def test_replacing_a_pair_serves_the_new_adapter_under_the_name(tiny_family, lora, tmp_path):
    """vLLM's load_inplace: the adapter's files changed; the new one serves under the old name, in a model of its
    own (never the old one's), and the old one is freed once its requests are done."""
    engine = _engine(_configured(tiny_family))
    _add(engine, _lora_pair(tiny_family, lora))
    old = engine.runners[-1]
    retrained = _save_lora(tiny_family.anti_expert, tmp_path / "retrained", seed=5)
    future = engine.add_pair(ExpertPairConfig(**_lora_pair(tiny_family, retrained)), replace=True)
    engine.step()
    assert [p.name for p in future.result(timeout=0)] == [None, None, "lora"]
    assert old.adapter is None  # freed: nothing ran on it
    reference = _engine(_configured(tiny_family, [_lora_pair(tiny_family, retrained, in_default=False)]))
    assert _serve(engine, Target(Serves.PROXY, 2), temperature=0) == _serve(reference, LORA_PAIR, temperature=0)


def test_a_change_the_step_loop_never_takes_up_fails_its_caller(tiny_family, lora):
    """The step loop stopped (or crashed) with a change pending: its caller hears so instead of waiting forever."""
    import asyncio

    from proxy_engine.async_engine import AsyncEngine
    from proxy_engine.request import EngineOverloadedError

    engine = _engine(_configured(tiny_family))
    future = engine.add_pair(ExpertPairConfig(**_lora_pair(tiny_family, lora)))
    engine.fail_changes(EngineOverloadedError("the engine has stopped", retry_after_s=5))
    with pytest.raises(EngineOverloadedError):
        future.result(timeout=0)
    engine.step()  # nothing left to take up
    assert [p.name for p in engine.config.experts] == [None]

    async def stopped() -> None:
        running = AsyncEngine(_configured(tiny_family))
        await running.start()
        await running.shutdown()
        with pytest.raises(EngineOverloadedError):
            await asyncio.wait_for(running.add_pair(ExpertPairConfig(**_lora_pair(tiny_family, lora))), 60)

    asyncio.run(stopped())


def test_a_pair_whose_runner_cannot_be_built_leaves_the_engine_as_it_was(tiny_family, lora, monkeypatch):
    """No memory for the new model's buffers, say: the caller hears why, the engine serves on as before, and the
    name can be loaded again."""
    engine = _engine(_configured(tiny_family))
    before = _serve(engine, Target.PROXY, temperature=0)
    build = engine._runner

    def out_of_memory(index: int, host: int | None = None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "_runner", out_of_memory)
    future = engine.add_pair(ExpertPairConfig(**_lora_pair(tiny_family, lora)))
    engine.step()
    with pytest.raises(RuntimeError, match="out of memory"):
        future.result(timeout=0)
    assert len(engine.runners) == len(engine.models) == len(engine.max_lens) == 3
    assert [p.name for p in engine.config.experts] == [None] and len(engine.intake.layout.pairs) == 1
    again = _serve(engine, Target.PROXY, prefix="again", temperature=0)
    assert [again[(f"again{k}", 0)] for k in range(len(PROMPTS))] == [before[(f"r{k}", 0)] for k in range(len(PROMPTS))]
    monkeypatch.setattr(engine, "_runner", build)
    assert [p.name for p in _add(engine, _lora_pair(tiny_family, lora))] == [None, "lora"]


def test_one_adapter_loaded_and_unloaded_again_and_again_keeps_every_index(tiny_family, lora):
    """A freed model is never shared by a later pair; and a later pair's own model, once freed too, must stay where
    it was when the layout is worked out again (not fold onto the first freed one), or every later index moves."""
    engine = _engine(_configured(tiny_family))
    reference = _engine(_configured(tiny_family, [_lora_pair(tiny_family, lora, in_default=False)]))
    expected = _serve(reference, LORA_PAIR, temperature=0)
    for name in ("a", "b"):
        _add(engine, _lora_pair(tiny_family, lora, name))
        engine.remove_pair(name)
        engine.step()
    _add(engine, _lora_pair(tiny_family, lora, "c"))
    assert len(engine.intake.layout.slots) == len(engine.runners) == 6  # base, expert, anti, a's, b's, c's
    assert engine.intake.layout.pairs[3] == (5, 2) and engine.runners[5].adapter is not None
    got = _serve(engine, Target(Serves.PROXY, 3), temperature=0)
    assert list(got.values()) == list(expected.values())


def test_an_adapter_served_by_name_caches_prompts_within_its_hosts_budget(tiny_family, lora, reference):
    """Loading many adapters holds one prefix-cache budget, their host's (vLLM's adapters share one pool); the
    default combination's models keep their own, and an unloaded adapter's blocks leave the pool."""
    engine = _engine(_configured(tiny_family))
    host = engine.runners[2].prefix_cache
    assert host is not None and engine.runners[1].prefix_cache.pool is not host.pool
    _add(engine, _lora_pair(tiny_family, lora))
    adapter = engine.runners[-1].prefix_cache
    assert adapter.pool is host.pool and adapter.budget_bytes == host.budget_bytes
    assert reference.runners[-1].prefix_cache.pool is reference.runners[2].prefix_cache.pool  # --lora-modules too
    _serve(engine, LORA_PAIR, temperature=0)
    assert adapter.num_blocks > 0 and host.num_blocks > 0 and host.pool.nbytes <= host.budget_bytes
    engine.remove_pair("lora")
    run_to_end(engine)
    assert adapter.num_blocks == 0 and host.pool.members == [host]


def test_the_named_pairs_that_running_and_queued_sequences_ask_for(tiny_family, lora):
    """What vLLM reports as its running and waiting LoRA adapters: by name, the default combination not among them."""
    config = _configured(tiny_family)
    config.limits.max_num_seqs = 1
    engine = _engine(config)
    _add(engine, _lora_pair(tiny_family, lora, name="sql"))
    assert engine.named_pairs_in_use() == ((), ())
    submit(engine, "default", "Hello", Target.PROXY, max_tokens=4, ignore_eos=True)
    submit(engine, "adapter", "Hello", LORA_PAIR, max_tokens=4, ignore_eos=True)
    engine.step()  # one row fits: the default request runs, the adapter's waits
    assert engine.named_pairs_in_use() == ((), ("sql",))
    while engine.has_work() and engine.named_pairs_in_use()[0] != ("sql",):
        engine.step()
    assert engine.named_pairs_in_use() == (("sql",), ())
    run_to_end(engine)
    assert engine.named_pairs_in_use() == ((), ())
