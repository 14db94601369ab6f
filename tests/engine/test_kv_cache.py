"""The runner's slot cache: rows joining and leaving at any time decode exactly as each row would alone."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from proxy_engine.runner import ModelRunner
from tests.threads import torch_threads


def _alone(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of one row, no cache, no batch."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _join(runner: ModelRunner, seq_ids: list[int], prompts: list[list[int]]) -> None:
    job = runner.start_prefill(seq_ids, prompts)
    while not job.complete:
        runner.prefill_step(job, 7)  # small chunks: the job spans several steps
    runner.add_rows(job)


def test_rows_join_and_leave_and_decode_as_alone(tiny_family):
    model = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.float32).eval()
    runner = ModelRunner(model, 512, 1, "base")
    rng = random.Random(0)
    sequences: dict[int, list[int]] = {}
    next_id = 0
    for step in range(40):
        if step % 5 == 0:  # a group of rows of different lengths joins
            group = []
            for _ in range(rng.randint(1, 3)):
                sequences[next_id] = [rng.randrange(10, 500) for _ in range(rng.randint(1, 12))]
                group.append(next_id)
                next_id += 1
            _join(runner, group, [sequences[i] for i in group])
        if step % 3 == 2 and runner.num_rows > 1:  # some rows leave, from anywhere in the batch
            leaving = set(rng.sample(runner.seq_ids, rng.randint(1, runner.num_rows - 1)))
            runner.keep_rows([i for i in runner.seq_ids if i not in leaving])
        assert sorted(runner.seq_ids) == sorted(set(runner.seq_ids))
        tokens = [rng.randrange(10, 500) for _ in runner.seq_ids]
        for seq_id, token in zip(runner.seq_ids, tokens):
            sequences[seq_id].append(token)
        logits = runner.decode(torch.tensor(tokens))
        for row, seq_id in enumerate(runner.seq_ids):
            torch.testing.assert_close(logits[row], _alone(model, sequences[seq_id]), atol=1e-4, rtol=1e-4)
    assert all(torch.isfinite(layer.k_buf).all() for layer in runner.cache.layers)
    runner.keep_rows([])
    assert runner.num_rows == 0 and runner.kv_bytes() == 0


def test_capacity_grows_and_is_kept_while_rows_run(tiny_family):
    model = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.float32).eval()
    runner = ModelRunner(model, 512, 1, "base")
    _join(runner, [0, 1], [[5, 6, 7], list(range(10, 70))])
    for _ in range(10):
        runner.decode(torch.tensor([11, 12]))
    capacity = runner.cache.capacity
    assert capacity >= 71 and runner.cache.lengths == [13, 70]
    runner.keep_rows([0])
    assert runner.seq_ids == [0] and runner.cache.capacity == capacity  # no copy of the batch on leave
    _join(runner, [2], [[1, 2, 3, 4]])
    assert runner.seq_ids == [0, 2] and runner.cache.lengths == [13, 4]


def _random_model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases, grouped-query heads
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(lin.bias, std=0.5)
    elif kind == "qwen3":  # RMSNorm over each query / key head, weights other than ones
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    elif kind in MIXTURE_KINDS:
        model = _random_mixture(kind, common)
    elif kind.startswith("gemma"):
        model = _random_gemma(kind, common)
    elif kind.startswith("olmo"):
        model = _random_olmo(kind, common)
    elif kind == "granite":  # embedding, residual, attention and logit multipliers (none of them 1)
        from transformers import GraniteConfig, GraniteForCausalLM

        model = GraniteForCausalLM(GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.37,
                                                 attention_multiplier=0.3, logits_scaling=2.5))
    else:  # rope scaling, padded head (logits past the 80-token shared vocabulary are cut)
        model = LlamaForCausalLM(LlamaConfig(
            **common, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    return model.eval()


def _random_gemma(kind: str, common: dict):
    """Gemma: (1 + w) norms, a scaled embedding, GELU; Gemma-2 adds output norms, soft-caps (eager attention) and
    windowed layers; Gemma-3 per-head q / k norms and a RoPE base of its own for the windowed layers. Every norm
    weight is drawn (Gemma initialises them to zero, where ``1 + w`` and ``w`` would be told apart by nothing
    but the offset), and the window (6) is shorter than the tests' sequences."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GemmaConfig,
        GemmaForCausalLM,
    )

    common = dict(common, head_dim=16)
    local = dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    if kind == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**common))
    elif kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, **local, attn_logit_softcapping=2.0,
                                               final_logit_softcapping=3.0, attn_implementation="eager"))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, **local, rope_local_base_freq=100.0))
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.uniform_(parameter, -0.5, 0.5)
    return model


MIXTURE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _random_mixture(kind: str, common: dict):
    """Routed experts: Mixtral (top 2 of 4, renormalised, float32 scores), Qwen2-MoE (not renormalised, a gated
    shared expert, its second layer dense: ``mlp_only_layers``), Qwen3-MoE (renormalised, per-head q / k norms),
    OLMoE (whole-projection q / k norms). The router weights are drawn wide, so that rows pick different experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    experts = dict(num_experts_per_tok=2, moe_intermediate_size=48)
    extra = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
             "qwen2_moe": dict(experts, num_experts=4, shared_expert_intermediate_size=40, mlp_only_layers=[1],
                               norm_topk_prob=False),
             "qwen3_moe": dict(experts, num_experts=4, head_dim=16, norm_topk_prob=True),
             "olmoe": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)}[kind]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra))
    for name, parameter in model.named_parameters():
        if name.endswith("gate.weight"):
            torch.nn.init.normal_(parameter, std=1.0)
        elif "experts" in name or "norm.weight" in name:
            torch.nn.init.normal_(parameter, mean=1.0 if "norm" in name else 0.0, std=0.3 if "norm" in name else 0.1)
    return model


def _random_olmo(kind: str, common: dict):
    """OLMo-2: no norm before a sub-block, one after each (Llama's weight applied in float32 before the cast), and
    the query / key norms each over its whole projection; OLMo-3 adds windowed layers (6) with their own RoPE.
    Every norm weight is drawn, so that a per-head reading of the projection norms or a missed output norm shows."""
    from transformers import Olmo2Config, Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM

    if kind == "olmo2":
        model = Olmo2ForCausalLM(Olmo2Config(**common))
    else:
        model = Olmo3ForCausalLM(Olmo3Config(**common, sliding_window=6,
                                             layer_types=["sliding_attention", "full_attention"]))
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.uniform_(parameter, 0.5, 1.5)
    return model


FAST_KINDS = ("qwen2", "qwen3", "llama", "gemma", "gemma2", "gemma3", "olmo2", "olmo3", "granite", *MIXTURE_KINDS)


def test_fast_decode_matches_transformers(monkeypatch):
    """The decode step without transformers' module stack gives transformers' logits (and is used)."""
    for kind in FAST_KINDS:
        model = _random_model(kind)
        fast = ModelRunner(model, 80, 0, kind)
        monkeypatch.setenv("PROXY_SERVE_FAST_DECODE", "0")
        slow = ModelRunner(model, 80, 0, kind)
        monkeypatch.delenv("PROXY_SERVE_FAST_DECODE")
        assert fast._fast is not None and slow._fast is None
        prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
        for runner in (fast, slow):
            _join(runner, [0, 1, 2], prompts)
        for step in range(6):
            if step == 3:
                for runner in (fast, slow):
                    runner.keep_rows([0, 2])
            tokens = torch.tensor([20 + step] * fast.num_rows)
            assert fast.seq_ids == slow.seq_ids
            torch.testing.assert_close(fast.decode(tokens), slow.decode(tokens), atol=1e-5, rtol=1e-5)
        assert fast.decode(torch.tensor([1, 2])).shape == (2, 80)


def test_experts_on_a_gpu_before_sm80_run_as_batched_mm(monkeypatch):
    """On a V100 or T4 transformers' grouped_mm loops over the experts reading their offsets to the host (no CUDA
    graph holds that): the loader switches such a model to batched_mm. The capability is played here."""
    from proxy_engine import architecture

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not architecture.grouped_mm_runs_on(torch.device("cuda:0"))
    assert architecture.grouped_mm_runs_on(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert architecture.grouped_mm_runs_on(torch.device("cuda:0"))
    model = _random_model("mixtral")
    monkeypatch.setattr(architecture, "grouped_mm_runs_on", lambda device: False)  # its weights "on a T4"
    assert architecture.fit_experts_implementation(model) == "batched_mm"
    assert model.config._experts_implementation == "batched_mm"


def test_expert_sizes_grouped_mm_refuses_run_as_batched_mm():
    """transformers' default grouped_mm fails on expert rows that are not a multiple of 16 bytes (its own forward
    too); the loader switches such a model to batched_mm, and both paths then decode it alike."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from proxy_engine.architecture import fit_experts_implementation

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=90, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2)).eval()
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        model(torch.tensor([[5, 6, 7]]))
    assert fit_experts_implementation(model) == "batched_mm" and model.config._experts_implementation == "batched_mm"
    assert fit_experts_implementation(_random_model("mixtral")) is None  # aligned sizes keep grouped_mm
    fast = ModelRunner(model, 80, 0, "mixtral")
    reference = model(torch.tensor([[5, 6, 7, 20]])).logits[0, -1, :80]
    _join(fast, [0], [[5, 6, 7]])
    torch.testing.assert_close(fast.decode(torch.tensor([20]))[0], reference, atol=1e-5, rtol=1e-5)


def test_unsupported_models_fall_back_to_transformers():
    from proxy_engine.architecture import unsupported_reason

    model = _random_model("llama")
    assert unsupported_reason(model) is None
    model.config.layer_types = ["full_attention", "chunked_attention"]
    assert unsupported_reason(model) == "layers other than full or sliding-window attention"
    qwen3 = _random_model("qwen3")
    assert unsupported_reason(qwen3) is None
    qwen3.model.layers[1].self_attn.k_norm.variance_epsilon = 1e-3  # not one norm for q and k: not the step's math
    reason = "query / key norms other than an RMSNorm over each head or over each whole projection"
    assert unsupported_reason(qwen3) == reason
    olmo2 = _random_model("olmo2")
    assert unsupported_reason(olmo2) is None
    olmo2.model.layers[0].self_attn.k_norm = torch.nn.LayerNorm(32)  # not an RMSNorm the step knows
    assert unsupported_reason(olmo2) == reason


def test_sliding_windows_decode_on_the_fast_paths_with_transformers_logits():
    """Mistral v0.1's window (every layer) and Qwen2's ``use_sliding_window`` (the layers past
    ``max_window_layers``) decode on the fast and static steps with a windowed mask, past the window as well,
    with transformers' logits; a window the sequences never outgrow builds no mask at all."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from proxy_engine.architecture import DecoderLayout, unsupported_reason
    from proxy_engine.config import RuntimeConfig
    from proxy_engine.executor.static_cache import SlotPlan

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**common, sliding_window=8)).eval()
    qwen_config = Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    qwen = Qwen2ForCausalLM(qwen_config).eval()
    assert qwen.config.layer_types == ["full_attention", "sliding_attention"]
    assert DecoderLayout(mistral, 8).windowed is False and DecoderLayout(mistral, 9).windowed is True
    for name, model in (("mistral", mistral), ("qwen2", qwen)):
        assert unsupported_reason(model) is None
        fast = ModelRunner(model, 80, 0, name, max_len=64)
        static = ModelRunner(model, 80, 0, name, max_len=64, runtime=RuntimeConfig(decode_executor="static"),
                             slot_plan=SlotPlan(3, 64, 0))
        slow = ModelRunner(model, 80, 0, name, max_len=64, runtime=RuntimeConfig(decode_executor="transformers"))
        assert (fast.executor, static.executor, slow.executor) == ("fast", "static", "transformers")
        prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
        for runner in (fast, static, slow):
            _join(runner, [0, 1, 2], prompts)
        for step in range(14):  # up to 19 tokens: well past the window of 8
            tokens = torch.tensor([20 + step] * 3)
            expected = slow.decode(tokens)
            torch.testing.assert_close(fast.decode(tokens), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(static.decode(tokens), expected, atol=1e-5, rtol=1e-5)


def test_packed_weights_give_the_plain_gemm_logits(monkeypatch):
    """From PACKED_MIN_ROWS rows on, decode runs on oneDNN-packed weight copies: same logits (float32 rounding)."""
    from proxy_engine.config import PACKED_WEIGHTS_ENV, RuntimeConfig

    model = _random_model("llama")
    packed = ModelRunner(model, 80, 0, "llama", runtime=RuntimeConfig(packed_weights=True))
    monkeypatch.setenv(PACKED_WEIGHTS_ENV, "0")  # the variable works as well, and wins over the config
    plain = ModelRunner(model, 80, 0, "llama", runtime=RuntimeConfig(packed_weights=True))
    assert packed._fast.packed is not None and plain._fast.packed is None
    rows = list(range(6))
    for runner in (packed, plain):
        _join(runner, rows, [[5 + i, 6, 7 + i] for i in rows])
    for step in range(4):
        tokens = torch.tensor([30 + step + i for i in rows])
        torch.testing.assert_close(packed.decode(tokens), plain.decode(tokens), atol=1e-4, rtol=1e-4)


def test_fused_weights_are_views_and_both_layouts_match_transformers():
    """q/k/v and gate/up share one storage per layer (no second copy); row- and column-major give the same logits."""
    from transformers import DynamicCache

    from proxy_engine.fast_decode import FastDecoder

    for column_major in (False, True):
        model = _random_model("llama")
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.inference_mode():
            expected = model(input_ids=ids, cache=DynamicCache()).logits[:, -1, :80]
        decoder = FastDecoder(model, 80, column_major=column_major)
        attn = model.model.layers[0].self_attn
        shared = attn.q_proj.weight.untyped_storage().data_ptr()
        assert attn.k_proj.weight.untyped_storage().data_ptr() == shared
        assert attn.q_proj.weight.is_contiguous() is not column_major
        runner = ModelRunner(model, 80, 0, "llama")
        runner._fast = decoder
        _join(runner, [0], [[5, 6, 7]])
        torch.testing.assert_close(runner.decode(torch.tensor([8])), expected, atol=1e-5, rtol=1e-5)


def test_rotary_table_gives_rotary_emb_values():
    from proxy_engine.fast_decode import RotaryTable

    model = _random_model("llama")
    rotary = model.model.rotary_emb
    table = RotaryTable(rotary, model.model.embed_tokens.weight)
    positions = torch.tensor([0, 3, 1500])
    cos, sin = table(positions, 1500)
    ref_cos, ref_sin = rotary(model.model.embed_tokens.weight[:1, None], positions.view(-1, 1))
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)


def test_one_row_bag_gemv_is_the_column_major_gemv():
    """A narrow column-major weight times one row, as a weighted embedding bag: the GEMV's values (float32
    rounding), with its bias; row-major or too-wide weights are not taken."""
    from proxy_engine.fast_decode import BAG_MAX_OUTPUTS, BagGemv

    torch.manual_seed(0)
    weight = torch.randn(96, 160).t().contiguous().t()  # [N, K] stored column-major
    bias = torch.randn(96)
    x = torch.randn(1, 160)
    assert BagGemv.fits(weight)
    torch.testing.assert_close(BagGemv(weight, bias)(x), torch.nn.functional.linear(x, weight, bias))
    torch.testing.assert_close(BagGemv(weight, None)(x), x @ weight.t())
    assert not BagGemv.fits(weight.contiguous())  # row-major: MKL's GEMV
    assert not BagGemv.fits(torch.randn(160, BAG_MAX_OUTPUTS + 1).t())  # wide: MKL's GEMV was faster


def test_one_row_steps_use_the_bags_and_give_transformers_logits():
    """A single stream on one thread decodes o / down through the bags (column-major float32 CPU weights) and
    still matches transformers step by step; a second row switches back to the GEMMs and matches too."""
    from transformers import DynamicCache

    from proxy_engine.fast_decode import BagGemv, rotate, rotate_signed

    model = _random_model("llama")
    runner = ModelRunner(model, 80, 0, "llama")
    decoder = runner._fast
    assert all(isinstance(layer[1], BagGemv) and isinstance(layer[3], BagGemv) for layer in decoder.bag_linears)
    assert not any(isinstance(fn, BagGemv) for layer in decoder.plain_linears for fn in layer)
    ids = [5, 6, 7, 8, 9, 10]
    with torch_threads(1):  # an earlier test may have left this thread's team at two (use_cpu_threads runs once)
        _join(runner, [0], [ids[:3]])
        for step, token in enumerate(ids[3:]):
            with torch.inference_mode():
                expected = model(input_ids=torch.tensor([ids[: 4 + step]]), cache=DynamicCache()).logits[:, -1, :80]
            torch.testing.assert_close(runner.decode(torch.tensor([token])), expected, atol=1e-5, rtol=1e-5)
        assert decoder.linears_for(1) is decoder.bag_linears and decoder.linears_for(2) is decoder.plain_linears
    x = torch.randn(2, 6, decoder.head_dim)
    cos, sin = decoder.rotary["full_attention"](torch.tensor([3, 9]), 9)
    _, signed = decoder.rotary["full_attention"].signed_sin(torch.tensor([3, 9]), 9)
    torch.testing.assert_close(rotate_signed(x, cos, signed), rotate(x, cos, sin))  # addcmul may fuse (FMA)


def test_one_row_steps_on_a_team_of_threads_use_the_gemv():
    """One bag runs on one thread, MKL's GEMV on the whole team: with two threads a single stream keeps the
    plain GEMV (the bags made the real model's step 1.25x slower there), and its logits are the same."""
    model = _random_model("llama")
    runner = ModelRunner(model, 80, 0, "llama")
    decoder = runner._fast
    _join(runner, [0], [[5, 6, 7]])
    with torch_threads(2):
        assert decoder.linears_for(1) is decoder.plain_linears
        two = runner.decode(torch.tensor([8]))
    other = ModelRunner(model, 80, 0, "llama")
    _join(other, [0], [[5, 6, 7]])
    with torch_threads(1):
        assert decoder.linears_for(1) is decoder.bag_linears
        one = other.decode(torch.tensor([8]))
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)
