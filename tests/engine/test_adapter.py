"""An expert given as a PEFT adapter over its anti-expert (proxy_engine/adapter.py): merged at load, it serves
exactly what the same fine-tune saved whole serves; how the config resolves it, and the adapters refused.

The reference merge is written here by hand (W + scale * B @ A, scale alpha / r, or alpha / sqrt(r) for rsLoRA),
so the test does not check peft against itself."""

from __future__ import annotations

import io
import math
import shutil

import peft
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from proxy_engine.adapter import merge_adapter
from proxy_engine.config import EngineConfig
from proxy_engine.engine import ProxyEngine
from proxy_engine.families import CHAT_TEMPLATE
from proxy_engine.loader import load_models
from proxy_engine.placement import plan_placement
from proxy_engine.request import Target
from proxy_engine.sampling_defaults import sampling_defaults
from server.check import check
from server.cli import resolve_settings
from server.settings import ConfigError
from tests.engine.conftest import run_to_end, submit

# peft's get_peft_model, which builds the test's adapters, calls a transformers API deprecated in 5.x.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Hello there", "The city of", "Once upon a time, in a land"]


def _save_lora(model_dir, out, *, rank=4, alpha=8, rslora=False, seed=0, with_tokenizer=False):
    """A LoRA over ``model_dir`` with drawn weights (peft starts B at zero: a no-op), saved to ``out``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    wrapped.save_pretrained(out)
    if with_tokenizer:  # an instruct LoRA's own tokenizer, holding the chat template the tuning used
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(out)
    return out


def _merged_by_hand(model_dir, adapter_dir, out=None):
    """The anti-expert with W += scale * B @ A for every adapted projection (saved whole to ``out``, if given)."""
    from safetensors.torch import load_file

    settings = peft.PeftConfig.from_pretrained(str(adapter_dir))
    scale = settings.lora_alpha / (math.sqrt(settings.r) if settings.use_rslora else settings.r)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    parameters = dict(model.named_parameters())
    merged = 0
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            parameters[target] += scale * b @ a
            merged += 1
    assert merged == len(TARGETS) * model.config.num_hidden_layers
    if out is not None:
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def lora(tiny_family, tmp_path_factory):
    return _save_lora(tiny_family.anti_expert, tmp_path_factory.mktemp("lora"))


def _config(family, expert: str, **expert_fields) -> EngineConfig:
    return EngineConfig(base={"path": str(family.base)},
                        experts=[{"expert": {"path": expert, **expert_fields},
                                  "anti_expert": {"path": str(family.anti_expert)}}])


def _greedy(config: EngineConfig) -> dict:
    engine = ProxyEngine(load_models(config), config)
    for k, prompt in enumerate(PROMPTS):
        submit(engine, f"r{k}", prompt, temperature=0, max_tokens=12, ignore_eos=True)
    return {key: (entry["tokens"], entry["text"]) for key, entry in run_to_end(engine).items()}


def test_an_adapter_expert_serves_what_the_merged_fine_tune_serves(tiny_family, lora, tmp_path):
    """``--expert ADAPTER --anti-expert SMALL``: token and character equal to the fine-tune saved whole; and the
    adapter matters (an expert equal to its anti-expert gives the base alone)."""
    merged = tmp_path / "merged"
    _merged_by_hand(tiny_family.anti_expert, lora, merged)
    served = _greedy(_config(tiny_family, str(lora)))
    assert served == _greedy(_config(tiny_family, str(merged)))
    assert served != _greedy(_config(tiny_family, str(tiny_family.anti_expert)))


@pytest.mark.parametrize("rslora", [False, True])
def test_the_merge_scales_as_lora_and_rslora_do(tiny_family, tmp_path, rslora):
    adapter = _save_lora(tiny_family.anti_expert, tmp_path / "a", rank=8, alpha=4, rslora=rslora, seed=3)
    model = merge_adapter(AutoModelForCausalLM.from_pretrained(tiny_family.anti_expert), str(adapter), "expert")
    expected = _merged_by_hand(tiny_family.anti_expert, adapter).state_dict()
    assert type(model).__name__ == "LlamaForCausalLM"  # unwrapped: the fast step reads plain modules
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)


def test_the_config_resolves_an_adapter_expert_over_its_anti_expert(tiny_family, lora, tmp_path):
    pair = _config(tiny_family, str(lora)).experts[0]
    assert (pair.expert.path, pair.expert.adapter) == (str(tiny_family.anti_expert), str(lora))
    assert pair.expert.tokenizer is None  # this adapter ships no tokenizer: the checkpoint's
    again = EngineConfig.model_validate(_config(tiny_family, str(lora)).model_dump())
    assert again.experts[0].expert == pair.expert  # resolving is idempotent (configs are dumped and re-read)
    plan = plan_placement(_config(tiny_family, str(lora)), device_count=0)
    assert plan.ok and plan.models[1].adapter == str(lora)
    # An explicit adapter over any checkpoint, the base's too.
    explicit = EngineConfig(base={"path": str(tiny_family.anti_expert), "adapter": str(lora)})
    assert explicit.base.adapter == str(lora)


def test_an_adapter_with_its_own_tokenizer_brings_its_chat_template(tiny_family, tmp_path):
    adapter = _save_lora(tiny_family.anti_expert, tmp_path / "chat-lora", with_tokenizer=True)
    config = _config(tiny_family, str(adapter), prompt_format="chat")
    assert config.experts[0].expert.tokenizer == str(adapter)
    assert plan_placement(config, device_count=0).ok  # the template is found, in the adapter's tokenizer
    models = load_models(config)
    expert = next(m for m in models if m.role == "expert")
    assert expert.tokenizer.chat_template == CHAT_TEMPLATE


def test_adapters_that_cannot_be_merged_are_refused_naming_them(tiny_family, lora, tmp_path):
    with pytest.raises(ValidationError, match=r"experts\.0\.expert\.adapter: .* is not a PEFT adapter"):
        _config(tiny_family, str(tiny_family.anti_expert), adapter=str(tmp_path / "nowhere"))
    with pytest.raises(ValidationError, match="cannot be merged into 4bit weights"):
        _config(tiny_family, str(tiny_family.anti_expert), adapter=str(lora), quantization="4bit")
    # trained over the base (another size): caught at load, naming the role and the adapter
    over_base = _save_lora(tiny_family.base, tmp_path / "over-base")
    with pytest.raises(ValueError, match=r"expert: the adapter .*over-base does not fit this model"):
        load_models(_config(tiny_family, str(over_base)))
    # prompt tuning adds virtual tokens: nothing to merge
    model = AutoModelForCausalLM.from_pretrained(tiny_family.anti_expert)
    prompt_tuning = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompt_tuning.save_pretrained(tmp_path / "prompt-tuning")
    with pytest.raises(ValueError, match="PROMPT_TUNING, which adds virtual prompt tokens"):
        load_models(_config(tiny_family, str(tmp_path / "prompt-tuning")))


@pytest.mark.parametrize("lora_mode", ["auto", "merged"])
def test_an_adapter_whose_weights_cannot_be_read_says_so(tiny_family, lora, tmp_path, lora_mode):
    """Truncated or mislabelled weight files: refused as unreadable, not merged instead (which would read them
    again) nor called a misfit."""
    import shutil

    shutil.copytree(lora, tmp_path / "broken")
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    config = _config(tiny_family, str(tmp_path / "broken"))
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"lora_mode": lora_mode})})
    with pytest.raises(ValueError, match=r"the adapter's weights in .*broken cannot be read \(SafetensorError"):
        load_models(config)


def test_a_model_directory_is_never_read_as_an_adapter(tiny_family, lora, tmp_path):
    """A fine-tune saved whole beside its adapter_config.json (``merge_and_unload`` then ``save_pretrained`` into
    the same folder) is the model it holds."""
    both = tmp_path / "both"
    shutil.copytree(tiny_family.expert, both)
    shutil.copy(lora / "adapter_config.json", both)
    assert _config(tiny_family, str(both)).experts[0].expert.adapter is None


def test_check_from_flags_names_the_adapter(tiny_family, lora):
    settings, _ = resolve_settings(["--check", "--base", str(tiny_family.base), "--expert", str(lora),
                                    "--anti-expert", str(tiny_family.anti_expert)])
    out, err = io.StringIO(), io.StringIO()
    assert check(settings, out=out, err=err) == 0, err.getvalue()
    assert f"{tiny_family.anti_expert} + adapter {lora}" in out.getvalue()
    with pytest.raises(ConfigError, match="is not a PEFT adapter"):
        resolve_settings(["--base", str(tiny_family.base), "--expert", str(tiny_family.anti_expert),
                          "--anti-expert", str(tiny_family.anti_expert), "--expert-adapter", "/nowhere"])


def test_the_adapters_generation_config_gives_the_expert_its_sampling_defaults(tiny_family, tmp_path):
    """A fine-tune's recommended sampling (Llama-2-chat's temperature 0.6, top_p 0.9) ships beside its adapter."""
    adapter = _save_lora(tiny_family.anti_expert, tmp_path / "lora")
    (adapter / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    defaults = sampling_defaults(_config(tiny_family, str(adapter)))
    assert defaults[Target.PROXY].values == {"temperature": 0.6, "top_p": 0.9}
    assert defaults[Target.PROXY].source == str(adapter / "generation_config.json")
