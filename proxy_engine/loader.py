"""Load the base and every expert / anti-expert pair, and refuse mismatched vocabularies before serving.

Each model has its own dtype and placement. The three tokenizers must map the same strings to the same ids
(regular and special tokens alike): proxy-tuning adds logits index by index, so a shifted id would steer
toward the wrong token. Logit rows wider than the shared vocabulary (padded embeddings, common in real
families) are cut to it; narrower rows are an error.

``from_pretrained_kwargs(model_config)`` turns one ``ModelConfig`` into the keyword arguments of
``AutoModelForCausalLM.from_pretrained`` (device map, memory caps, dtype, quantization; ``text_model.auto_class``
picks ``AutoModelForImageTextToText`` for a type only it loads), as the placement plan
(placement.py) foresaw; ``input_device(model)`` says where a loaded (possibly sharded) model wants its input ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from proxy_engine.adapter import find_adapter, merge_adapter
from proxy_engine.architecture import fit_experts_implementation
from proxy_engine.attention_masks import unsupported_layers
from proxy_engine.config import EngineConfig, ModelConfig, RuntimeConfig
from proxy_engine.device_memory import usable_bytes
from proxy_engine.executor.selection import wants_static
from proxy_engine.gguf_files import find_gguf, require_gguf
from proxy_engine.layout import ModelLayout
from proxy_engine.lora import LoraAdapter, UnreadableAdapterError, merge_reason
from proxy_engine.memory import config_dtype, parse_size, resolve_dtype
from proxy_engine.model_files import context_length, locate, read_config, text_config
from proxy_engine.placement import accelerate_key, normalise_device
from proxy_engine.prompts import PromptRenderer
from proxy_engine.text_model import auto_class, text_model

log = logging.getLogger("proxy_engine.loader")

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FALLBACK_MAX_LEN = 2048


@dataclass(eq=False, kw_only=True)
class LoadedModel:
    role: str  # "base", "expert", "anti_expert" (with a pair index past the first: "expert_1")
    # Every role this one model plays (layout.py: roles naming the same model share it); () means (role,).
    roles: tuple[str, ...] = ()
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: object
    renderer: PromptRenderer
    max_len: int  # positions the model supports
    logits_width: int  # rows of its output layer (may exceed the vocabulary)
    vocab_size: int = 0  # the shared vocabulary, set once every model is loaded
    # A LoRA served unmerged: ``model`` is then another role's (its anti-expert's) module, shared (lora.py).
    adapter: LoraAdapter | None = None

    def __post_init__(self) -> None:
        self.roles = self.roles or (self.role,)


def check_vocabularies(tokenizers: dict[str, object], shown: int = 5) -> int:
    """Return the shared vocabulary size, or raise ``ValueError`` naming the first differences.

    Every id below the smallest vocabulary must name the same token in every tokenizer (special tokens
    included). A tokenizer may add tokens *past* that range (CodeLlama's infilling tokens, say): those ids
    are cut like padded logit rows, since the other models cannot score them.
    """
    names = list(tokenizers)
    vocabs = {name: tokenizers[name].get_vocab() for name in names}
    shared = min(len(v) for v in vocabs.values())
    by_id = {name: {i: t for t, i in vocab.items() if i < shared} for name, vocab in vocabs.items()}
    reference_name = names[0]
    reference = by_id[reference_name]
    problems: list[str] = []
    for name in names[1:]:
        other = by_id[name]
        if other == reference:
            continue
        differences = []
        for token_id in range(shared):
            a, b = reference.get(token_id), other.get(token_id)
            if a != b:
                differences.append(f"id {token_id} is {a!r} in {reference_name} but {b!r} in {name}")
                if len(differences) == shown:
                    break
        sizes = f" ({len(vocabs[reference_name])} vs {len(vocabs[name])} tokens)"
        problems.append(f"{name} differs from {reference_name}{sizes}: " + "; ".join(differences))
    if problems:
        raise ValueError(
            "the models do not share one vocabulary, so their logits cannot be combined: " + " | ".join(problems)
        )
    for name, vocab in vocabs.items():
        if len(vocab) > shared:
            extra = sorted((i, t) for t, i in vocab.items() if i >= shared)[:shown]
            log.warning("%s has %d tokens past the shared vocabulary of %d (cut): %s", name, len(vocab) - shared,
                        shared, ", ".join(repr(t) for _, t in extra))
    return shared


def max_positions(model: torch.nn.Module, tokenizer) -> int:
    """The model's context: its config's (``model_files.context_length``), else its tokenizer's limit."""
    stated = context_length(model.config.to_dict())
    if stated is not None:
        return stated
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else _FALLBACK_MAX_LEN


def logits_width(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def eos_token_ids(models: list[LoadedModel]) -> list[int]:
    """Every id any model treats as end of sequence (a chat expert's end-of-turn included), within the shared
    vocabulary.

    An end id past the shared vocabulary (a Mistral base with an OpenHermes expert: ``<|im_end|>`` is 32000, the
    shared vocabulary 32000 tokens) can never be sampled, since the combined logits stop at the shared
    vocabulary: it is dropped with a warning (banning it for ``min_tokens`` indexed past the logits).
    """
    ids: dict[int, str] = {}
    for loaded in models:
        for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.setdefault(source, loaded.role)
            elif isinstance(source, (list, tuple)):
                for i in source:
                    ids.setdefault(int(i), loaded.role)
    shared = min((m.vocab_size for m in models if m.vocab_size), default=0)
    if shared:
        for token_id, role in sorted(ids.items()):
            if token_id >= shared:
                log.warning(
                    "the %s model's end id %d lies past the shared vocabulary of %d tokens: it can never be sampled "
                    "and is ignored (that model's turns end only on the shared end ids, stop strings or max_tokens)",
                    role, token_id, shared,
                )
                del ids[token_id]
    return sorted(ids)


# ------------------------------------------------------------------------------------------ from_pretrained
def from_pretrained_kwargs(model_config: ModelConfig, utilization: float | None = None) -> dict[str, Any]:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained(model_config.path, **kwargs)``.

    - ``dtype``: a ``torch.dtype``, or "auto" (the checkpoint's dtype; float32 when it names none).
    - ``device_map``: None for the CPU (a plain load), ``{"": device}`` for one device, "auto" for "auto" and
      for a list of GPUs; a list also gets ``max_memory`` holding exactly those GPUs (the others absent, so
      accelerate puts nothing on them), each capped by ``max_memory`` or else by its free memory now (within
      ``utilization`` of its total: ``gpu_memory_utilization``).
    - ``quantization_config``: a ``BitsAndBytesConfig`` for 8bit / 4bit.
    - ``local_files_only=True`` always (never download); ``revision`` and ``trust_remote_code`` as configured.
    - ``gguf_file`` for a GGUF source (see ``model_source``), whose ``auto`` dtype is float32.
    """
    kwargs: dict[str, Any] = {
        "dtype": "auto" if model_config.dtype == "auto" else TORCH_DTYPES[model_config.dtype],
        "local_files_only": True,
        "trust_remote_code": model_config.trust_remote_code,
    }
    _, gguf = model_source(model_config)
    if gguf:
        # A GGUF file names no dtype: "auto" is float32, as the placement plan counted it (memory.resolve_dtype).
        kwargs.update(gguf, dtype=TORCH_DTYPES[resolve_dtype(model_config, None)])
    elif model_config.revision is not None:
        kwargs["revision"] = model_config.revision
    caps: dict[int | str, int] = {
        accelerate_key(k): parse_size(v) for k, v in (model_config.max_memory or {}).items()
    }
    device = model_config.device
    if isinstance(device, list):
        gpus = [accelerate_key(d) for d in device]
        max_memory: dict[int | str, int] = {}
        for gpu in gpus:
            cap = caps.get(gpu)
            if cap is None:
                cap = usable_bytes(torch.device("cuda", gpu), utilization) if isinstance(gpu, int) else None
            if cap is None:
                raise ValueError(
                    f"{model_config.path}: cannot size cuda:{gpu} (no such GPU visible); give max_memory for it"
                )
            max_memory[gpu] = cap
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = max_memory
    elif device == "auto":
        kwargs["device_map"] = "auto"
        if caps:
            kwargs["max_memory"] = caps
    elif device == "cpu":
        kwargs["device_map"] = None
    else:
        kwargs["device_map"] = {"": normalise_device(device)}

    if model_config.quantization != "none":
        from transformers import BitsAndBytesConfig

        if model_config.quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            compute = TORCH_DTYPES.get(model_config.dtype, torch.bfloat16)
            if model_config.dtype == "auto":  # the checkpoint's 16-bit dtype when it names one
                _, directory, _ = locate(model_config)
                named = config_dtype(read_config(directory)) if directory is not None else None
                compute = TORCH_DTYPES[named] if named and named != "float32" else torch.float16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
    return kwargs

def input_device(model: torch.nn.Module) -> torch.device:
    """Where input ids must go: the embedding layer's device (the first shard when layers are spread)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and device_map:
        first = next(iter(device_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        if first not in ("disk", "meta"):
            return torch.device(first)
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def model_source(config: ModelConfig) -> tuple[str, dict[str, str]]:
    """What ``from_pretrained`` is given: the path, and ``{"gguf_file": name}`` for a GGUF source (then the path
    is the directory holding it). Raises ``ImportError`` naming the extra when a GGUF file needs ``gguf``."""
    file, error = find_gguf(config.path, config.gguf_file)
    if error:
        raise ValueError(error)
    if file is None:
        return config.path, {}
    require_gguf()
    return str(file.parent), {"gguf_file": file.name}


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer (a GGUF file's from its metadata), or the one ``config.tokenizer`` names."""
    from transformers import AutoTokenizer

    common = {"trust_remote_code": config.trust_remote_code, "local_files_only": True}
    if config.tokenizer is not None:
        return AutoTokenizer.from_pretrained(config.tokenizer, **common)
    path, gguf = model_source(config)
    if gguf:
        return AutoTokenizer.from_pretrained(path, **gguf, **common)
    return AutoTokenizer.from_pretrained(path, revision=config.revision, **common)


def warn_if_tools_unseen(role: str, renderer: PromptRenderer) -> None:
    """Say at start-up when a chat template ignores ``tools``: the model would not see a request's tools."""
    if not renderer.ignores_tools:
        return
    if renderer.tools_preamble:
        log.info("the %s model's chat template ignores tools: a request's tools are written into its system "
                 "message (tools_preamble)", role)
    else:
        log.warning(
            "the %s model's chat template ignores tools: it will not see a request's tools (tool_choice 'required' "
            "or a named function still calls through the grammar, but 'auto' relies on the model); set "
            "tools_preamble: true for this model to write them into its system message (docs/gguf.md)", role,
        )


def _refuse_unsupported_layers(role: str, config: ModelConfig, model_type: str | None,
                               layer_types: list[str] | None) -> None:
    reason = unsupported_layers(model_type, layer_types)
    if reason is not None:
        raise ValueError(f"{role} ({config.path}): {reason}")


def _renderer(role: str, config: ModelConfig, tokenizer, transcript_template: str) -> PromptRenderer:
    renderer = PromptRenderer(tokenizer, config.prompt_format, transcript_template, config.chat_template,
                              tools_preamble=config.tools_preamble)
    warn_if_tools_unseen(role, renderer)
    return renderer


def load_one(role: str, config: ModelConfig, tokenizer, transcript_template: str,
             utilization: float | None = None) -> LoadedModel:
    started = time.perf_counter()
    log.info("loading %s from %s%s (device %s, dtype %s)", role, config.path,
             f" with the adapter {config.adapter}" if config.adapter else "", config.device, config.dtype)
    renderer = _renderer(role, config, tokenizer, transcript_template)
    _, directory, _ = locate(config)
    checkpoint_config = (read_config(directory) or {}) if directory is not None else {}
    model_type = checkpoint_config.get("model_type")  # the wrapper's, for a vision wrapper: auto_class needs it
    decoder_config = text_config(checkpoint_config)
    # Before the weights load: a 70B checkpoint is refused in a second, not minutes.
    _refuse_unsupported_layers(role, config, decoder_config.get("model_type"), decoder_config.get("layer_types"))
    kwargs = from_pretrained_kwargs(config, utilization)
    model = auto_class(model_type).from_pretrained(model_source(config)[0], **kwargs).eval()
    if config.adapter is not None:  # before text_model: the adapter names the checkpoint's own modules
        model = merge_adapter(model, config.adapter, role).eval()
    model = text_model(model, role)  # Gemma-3 4B+ and the like: the text decoder of an image-text-to-text model
    if (experts := fit_experts_implementation(model)) is not None:
        log.info("%s: grouped_mm cannot run these experts here (rows not a multiple of 16 bytes, or a GPU before "
                 "SM80): they run as %s", role, experts)
    # Layer types transformers' config class derives where config.json lists none (a family not named above).
    _refuse_unsupported_layers(role, config, model.config.model_type, getattr(model.config, "layer_types", None))
    loaded = LoadedModel(role=role, config=config, model=model, tokenizer=tokenizer, renderer=renderer,
                         max_len=max_positions(model, tokenizer), logits_width=logits_width(model))
    parameters = sum(p.numel() for p in model.parameters())
    devices = sorted({str(p.device) for p in model.parameters()})
    log.info(
        "loaded %s: %.1fM parameters on %s as %s in %.1fs",
        role, parameters / 1e6, ",".join(devices), next(model.parameters()).dtype, time.perf_counter() - started,
    )
    return loaded


def load_unmerged(role: str, config: ModelConfig, host: LoadedModel, tokenizer, transcript_template: str,
                  runtime: RuntimeConfig) -> LoadedModel | None:
    """``config`` (``host``'s checkpoint plus a LoRA) served unmerged over ``host``'s module, or None (logged
    with the reason) when it is to be merged into a copy instead."""
    assert config.adapter is not None
    directory = find_adapter(config.adapter)
    reason = merge_reason(directory, runtime.lora_mode,
                          wants_static(host.model, input_device(host.model), runtime, host.max_len))
    adapter = None
    if reason is None:
        try:
            adapter = LoraAdapter.load(directory, host.model, config.adapter)
        except UnreadableAdapterError:
            raise  # merging would read the same files
        except ValueError as error:
            reason = str(error)
    if adapter is None:
        log.info("%s: the adapter %s is merged into a copy of the %s model (%s)", role, config.adapter, host.role,
                 reason)
        return None
    renderer = _renderer(role, config, tokenizer, transcript_template)
    log.info("%s: the LoRA adapter %s runs unmerged over the %s model's weights (%d projections, %.3g MB of terms)",
             role, config.adapter, host.role, len(adapter.terms), adapter.nbytes / 1e6)
    return LoadedModel(role=role, config=config, model=host.model, tokenizer=tokenizer, adapter=adapter,
                       renderer=renderer, max_len=host.max_len, logits_width=host.logits_width)


def load_models(config: EngineConfig, loaded: list[LoadedModel] | None = None,
                layout: ModelLayout | None = None) -> list[LoadedModel]:
    """Base first, then expert / anti-expert of each pair, each distinct model once (``ModelLayout``: a model
    several roles name is loaded once; an expert given as a LoRA over its anti-expert's checkpoint runs over that
    model, unmerged, where ``load_unmerged`` can); vocabularies checked, widths validated.

    The tokenizers are loaded and compared before any weights, so a mismatched deployment fails in seconds
    rather than after loading a 70B model.

    ``loaded``: the models of the first slots, already loaded (a pair added to a running engine): only the slots
    past them load, over them where an adapter's host is one of them, and they must keep the vocabulary those
    models share; ``layout`` is then the running engine's (with its removed pairs). Returns every slot's model.
    """
    layout = layout or ModelLayout.of(config)
    slots = layout.slots
    loaded = list(loaded or [])
    new = range(len(loaded), len(slots))
    tokenizers = {slot.name: load_tokenizer(slot.config) for slot in (slots[index] for index in new)}
    if loaded:  # the running models' vocabulary stays: a tokenizer that would shrink it is refused
        vocab_size = check_vocabularies({"base": loaded[0].tokenizer, **tokenizers})
        if vocab_size != loaded[0].vocab_size:
            raise ValueError(f"{', '.join(tokenizers)} has {vocab_size} tokens, fewer than the {loaded[0].vocab_size} "
                             "the running models share")
    else:
        vocab_size = check_vocabularies(tokenizers)
    for slot in layout.shared:
        log.info("%s: one model for the roles %s (loaded once, run once per step)", slot.config.path,
                 ", ".join(slot.roles))
    utilization = config.runtime.gpu_memory_utilization
    hosts = {index: host for index in new if (host := layout.adapter_host(index)) is not None}
    loaded_slots: dict[int, LoadedModel] = dict(enumerate(loaded))
    for index in new:  # the hosts first: an adapter's slot may come before its host's
        if index not in hosts:
            slot = slots[index]
            loaded_slots[index] = load_one(slot.name, slot.config, tokenizers[slot.name], config.transcript_template,
                                           utilization)
    for index, host in hosts.items():
        slot = slots[index]
        loaded_slots[index] = (
            load_unmerged(slot.name, slot.config, loaded_slots[host], tokenizers[slot.name],
                          config.transcript_template, config.runtime)
            or load_one(slot.name, slot.config, tokenizers[slot.name], config.transcript_template, utilization))
    models = [loaded_slots[index] for index in range(len(slots))]
    for model in models[len(loaded):]:
        model.vocab_size = vocab_size
        if model.logits_width < vocab_size:
            raise ValueError(
                f"{model.role} ({model.config.path}) has {model.logits_width} logit rows, fewer than the "
                f"{vocab_size} tokens of the shared vocabulary"
            )
        if model.logits_width > vocab_size:
            log.info("%s: cutting %d logit rows to the shared vocabulary of %d", model.role, model.logits_width,
                     vocab_size)
    for slot, model in zip(slots, models, strict=True):
        model.roles = slot.roles  # a running model may take a new pair's role too
    return models
