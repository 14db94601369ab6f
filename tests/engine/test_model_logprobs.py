"""Per-model logprobs (``SamplingParams.model_logprobs``): each model's own distribution at every generated
token, against a naive reference that recomputes every model over its full sequence."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from proxy_engine.request import FieldError, SamplingParams, Target
from tests.engine.conftest import make_engine, run_to_end, submit
from tests.engine.reference import NaiveProxy

ROLES = ["base", "expert", "anti_expert", "proxy"]


@pytest.fixture(scope="module")
def naive(chat_family, chat_models):
    return NaiveProxy([str(chat_family.base), str(chat_family.expert), str(chat_family.anti_expert)],
                      chat_models[0].vocab_size)


def analyses(engine) -> list:
    out = []
    while engine.has_work():
        for output in engine.step():
            out += output.model_logprobs or []
    return out


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_every_model_distribution_matches_the_reference(chat_family, chat_models, naive, alpha):
    """Each model's logprobs are its own log_softmax (chat expert on its template), the proxy's the combination;
    at alpha 0 the small models still run (their distributions are shown) but weigh nothing."""
    engine = make_engine(chat_models, chat_family)
    (sequence,) = submit(engine, "r", "Hello there", temperature=0, max_tokens=5, ignore_eos=True, alpha=alpha,
                         model_logprobs=4)
    assert sorted(sequence.prompts) == [0, 1, 2]
    entries = analyses(engine)
    assert len(entries) == 5
    tokens = [e.token_id for e in entries]
    weights = [1.0, alpha, -alpha]
    prompts = [list(sequence.prompts[i]) for i in range(3)]
    for step, entry in enumerate(entries):
        assert [m.role for m in entry.models] == ROLES
        contexts = [p + tokens[:step] for p in prompts]
        own = [torch.log_softmax(naive.logits([c if i == m else None for i, c in enumerate(contexts)],
                                              [float(i == m) for i in range(3)]).double(), -1) for m in range(3)]
        proxy = torch.log_softmax(naive.logits(contexts, weights).double(), -1)
        for model, expected in zip(entry.models, [*own, proxy]):
            assert model.logprob == pytest.approx(expected[entry.token_id].item(), abs=2e-4)
            assert [t.token_id for t in model.top] == expected.topk(4).indices.tolist()
            assert [t.logprob for t in model.top] == pytest.approx(expected.topk(4).values.tolist(), abs=2e-4)
        assert entry.token_id == entry.models[-1].top[0].token_id  # greedy: the proxy's top-1
        assert entry.shift == pytest.approx(entry.models[-1].logprob - entry.models[0].logprob)
        if alpha == 0.0:
            assert entry.shift == pytest.approx(0.0, abs=1e-5)


def test_texts_join_to_the_completion_and_outputs_pickle(chat_family, chat_models):
    """Entry texts are what each token added (as logprobs' are); the output crosses a process boundary."""
    engine = make_engine(chat_models, chat_family)
    submit(engine, "r", "Hello", temperature=0, max_tokens=6, ignore_eos=True, model_logprobs=2, logprobs=1, n=2)
    texts, joined, logprob_texts = {}, {}, {}
    while engine.has_work():
        for output in engine.step():
            assert pickle.loads(pickle.dumps(output)) == output
            texts[output.index] = texts.get(output.index, "") + output.text_delta
            joined[output.index] = joined.get(output.index, "") + "".join(e.token for e in output.model_logprobs or [])
            logprob_texts[output.index] = logprob_texts.get(output.index, "") + "".join(
                e.token for e in output.logprobs or [])
    assert set(texts) == {0, 1}
    assert joined == texts == logprob_texts


def test_costs_nothing_unless_asked(chat_family, chat_models):
    """Without the field no output carries it and the small models skip alpha-0 rows as before."""
    engine = make_engine(chat_models, chat_family)
    (sequence,) = submit(engine, "r", "Hello", temperature=0, max_tokens=3, ignore_eos=True, alpha=0.0)
    assert sorted(sequence.prompts) == [0]
    while engine.has_work():
        assert all(output.model_logprobs is None for output in engine.step())


def test_mixed_batch_only_the_asking_rows(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    submit(engine, "a", "Hello", temperature=0, max_tokens=4, ignore_eos=True, model_logprobs=1)
    submit(engine, "b", "Hello", temperature=0, max_tokens=4, ignore_eos=True)
    submit(engine, "c", "Hi", temperature=0, max_tokens=4, ignore_eos=True, alpha=0.0, model_logprobs=0)
    seen: dict[str, list] = {"a": [], "b": [], "c": []}
    while engine.has_work():
        for output in engine.step():
            seen[output.request_id].append(output.model_logprobs)
    assert all(len(entries) == 1 and len(entries[0].models) == 4 for entries in seen["a"])
    assert all(len(m.top) == 1 for m in seen["a"][0][0].models)
    assert all(entries is None for entries in seen["b"])
    assert all(m.top == [] for entries in seen["c"] for m in entries[0].models)  # k 0: the chosen token only


@pytest.mark.parametrize("target", [Target.BASE, Target.EXPERT])
def test_refused_for_one_model_alone(chat_family, chat_models, target):
    engine = make_engine(chat_models, chat_family)
    with pytest.raises(FieldError, match="model_logprobs") as caught:
        submit(engine, "r", "Hello", target=target, max_tokens=2, model_logprobs=2)
    assert caught.value.param == "model_logprobs"


def test_bounded_like_logprobs(chat_family, chat_models):
    engine = make_engine(chat_models, chat_family)
    with pytest.raises(ValueError, match="model_logprobs must be between 0 and 20"):
        submit(engine, "r", "Hello", max_tokens=2, model_logprobs=21)
    assert run_to_end(engine) == {}


def test_entry_limit_names_the_field(chat_family, chat_models):
    from proxy_engine.async_engine import check_logprob_entries

    engine = make_engine(chat_models, chat_family)
    params = SamplingParams(max_tokens=10, model_logprobs=4, n=2)
    sequences = submit(engine, "r", "Hello", max_tokens=10, model_logprobs=4, n=2)
    check_logprob_entries(sequences, params, 2 * 10 * 4 * 5)  # exactly at the limit: fine
    with pytest.raises(FieldError, match="max_logprob_entries") as caught:
        check_logprob_entries(sequences, params, 2 * 10 * 4 * 5 - 1)
    assert caught.value.param == "model_logprobs"


def test_with_prompt_logprobs_at_alpha_zero(tiny_family):
    """The small models run for the analysis but weigh nothing in the prompt's scores either."""
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.loader import load_models
    from tests.engine.conftest import engine_config

    config = engine_config(tiny_family)
    engine = ProxyEngine(load_models(config), config)
    scored = {}
    for request_id, extra in (("analysed", {"model_logprobs": 1, "alpha": 0.0}), ("base", {"alpha": 0.0})):
        submit(engine, request_id, "one two three", max_tokens=1, temperature=0, prompt_logprobs=2, **extra)
        while engine.has_work():
            for output in engine.step():
                if output.prompt_logprobs is not None:
                    scored[request_id] = [(e.token_id, e.logprob) for e in output.prompt_logprobs]
    assert scored["analysed"][0] == scored["base"][0]
    for (token, got), (_, expected) in zip(scored["analysed"][1:], scored["base"][1:]):
        assert got == pytest.approx(expected, abs=1e-5), token


def test_two_expert_pairs_name_each_model(tiny_family):
    from proxy_engine.config import ExpertPairConfig
    from proxy_engine.engine import ProxyEngine
    from proxy_engine.loader import load_models
    from tests.engine.conftest import engine_config

    config = engine_config(tiny_family)
    config.experts = [config.experts[0], ExpertPairConfig(**config.experts[0].model_dump())]
    engine = ProxyEngine(load_models(config), config)
    submit(engine, "r", "Hello", temperature=0, max_tokens=2, ignore_eos=True, alpha=[1.0, 0.5], model_logprobs=1)
    entries = analyses(engine)
    # The second pair names the first pair's models: one model per role pair, run once, named by both roles.
    assert len(engine.runners) == 3
    models = {m.role: m for m in entries[0].models}
    assert [m.role for m in entries[0].models] == ["base", "expert", "expert_1", "anti_expert", "anti_expert_1",
                                                   "proxy"]
    assert models["expert"] == dataclasses.replace(models["expert_1"], role="expert")


def test_row_by_row_retry_keeps_each_rows_analysis(chat_family, chat_models):
    """A sampling batch that fails is retried row by row: the surviving row's per-model logprobs are its own."""

    def run(fault: bool) -> dict[str, list]:
        engine = make_engine(chat_models, chat_family)

        def hook(phase, sequences):
            if fault and phase == "sample" and any(s.request_id == "bad" for s in sequences):
                raise RuntimeError("injected")

        engine.fault_hook = hook
        submit(engine, "good", "Hello", temperature=0, max_tokens=3, ignore_eos=True, model_logprobs=2)
        if fault:
            submit(engine, "bad", "Hello", temperature=0, max_tokens=3, ignore_eos=True, model_logprobs=2)
        seen: dict[str, list] = {"good": [], "bad": []}
        while engine.has_work():
            for output in engine.step():
                seen[output.request_id] += output.model_logprobs or []
        return seen

    faulty, clean = run(True), run(False)
    assert faulty["bad"] == []
    assert [(e.token_id, [m.role for m in e.models]) for e in faulty["good"]] == [
        (e.token_id, [m.role for m in e.models]) for e in clean["good"]]
    for got, expected in zip(faulty["good"], clean["good"]):
        assert [m.logprob for m in got.models] == pytest.approx([m.logprob for m in expected.models], abs=1e-5)
