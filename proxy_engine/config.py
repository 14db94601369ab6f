"""Engine configuration: which models, where they live, and the batching limits.

One pydantic model is the single source of truth: the YAML file, the CLI flags and ``--check`` all validate
through it, and an unknown key is an error (``extra="forbid"``) rather than a silently ignored typo.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]
PromptFormat = Literal["plain", "chat"]

_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?|mps)$")
_PAIR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_PAIR_NAMES = frozenset({"base", "expert"})  # the model ids of the parts alone
# vLLM's other names for formats read here (EngineConfig._tool_parser_alias)
TOOL_PARSER_ALIASES = {"llama4_json": "llama3_json", "llama4_pythonic": "pythonic"}

# A plain transcript for models that see chat requests as text (the base and anti-expert in the paper).
# ``tools_text`` (set when a request brings tools) lists them and shows the family's call format; an assistant's
# earlier calls arrive already written out in its content, and tool results as role "tool".
DEFAULT_TRANSCRIPT_TEMPLATE = (
    "{% if tools_text %}{{ tools_text }}\n\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'tool' %}Tool: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


DEFAULT_MAX_LOGPROBS = 20  # OpenAI's and vLLM's


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelConfig(_Strict):
    """One causal LM: where to load it from and how it sees prompts."""

    path: str = Field(
        description="Local directory, a hub id already in the local cache (never downloaded), or a GGUF file (or a "
        "directory holding one): see docs/gguf.md.",
    )
    adapter: str | None = Field(
        default=None, description="A PEFT adapter (LoRA and its kin: a directory holding adapter_config.json, or a "
        "cached hub id) merged into this model's weights at load. An expert whose path is an adapter gets the "
        "anti-expert's checkpoint as its path and the adapter here (proxy_engine/adapter.py).",
    )
    gguf_file: str | None = Field(
        default=None, description="The GGUF file to load from the directory ``path`` (when it holds several)."
    )
    tokenizer: str | None = Field(
        default=None, description="A tokenizer directory or cached hub id to use instead of the model's own (a GGUF "
        "file's comes from its metadata).",
    )
    dtype: DType = "auto"
    device: str | list[str] = Field(
        default="cpu",
        description="'cpu', 'cuda:N', 'auto', or a list of GPUs ['cuda:0', 'cuda:1'] to spread layers over.",
    )
    max_memory: dict[str, str] | None = Field(
        default=None, description="Per-device memory caps for accelerate's device_map, e.g. {'cuda:0': '20GiB'}."
    )
    prompt_format: PromptFormat = Field(
        default="plain", description="'plain': the text as given; 'chat': wrapped in the model's chat template."
    )
    chat_template: str | None = Field(
        default=None, description="A Jinja chat template overriding the tokenizer's (only for prompt_format: chat)."
    )
    tools_preamble: bool = Field(
        default=False, description="For a chat template that ignores a request's tools (prompt_format: chat): "
        "write them into the system message, Hermes-style, so the model sees them (see docs/gguf.md).",
    )
    quantization: Literal["none", "8bit", "4bit"] = "none"
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | list[str]) -> str | list[str]:
        devices = [value] if isinstance(value, str) else value
        if not devices:
            raise ValueError("device list is empty")
        for device in devices:
            if not _DEVICE_RE.match(device):
                raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda:N', 'auto' or a list of 'cuda:N'")
        if isinstance(value, list) and any(d in ("cpu", "auto") for d in value) and len(value) > 1:
            raise ValueError("a device list names GPUs only ('cuda:N')")
        return value


class ExpertPairConfig(_Strict):
    """A fine-tuned small expert and the same small model before tuning."""

    expert: ModelConfig
    anti_expert: ModelConfig
    alpha: float = Field(default=1.0, description="Default strength of this pair; a request may override it.")
    name: str | None = Field(
        default=None, description="Serve this pair alone too, under the model ids '<served name>:<name>' (the base "
        "steered by this pair only, the other pairs' alpha 0) and '<served name>:<name>:expert' (its expert "
        "alone): what a chat frontend's model picker can choose, as vLLM's LoRA module names.",
    )
    in_default: bool = Field(
        default=True, description="Whether this pair steers the default proxy-tuned model ('<served name>'). A pair "
        "left out (false) is served only under its own name, as vLLM serves a LoRA module beside the base model: "
        "it needs a name.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None and (not _PAIR_NAME_RE.match(name) or name in RESERVED_PAIR_NAMES):
            raise ValueError(f"{name!r}: a pair's name is letters, digits, '.', '_' and '-' (starting with a letter "
                             f"or digit), and not {' or '.join(sorted(RESERVED_PAIR_NAMES))}")
        return name


ALLOW_LONG_MAX_MODEL_LEN_ENV = "PROXY_SERVE_ALLOW_LONG_MAX_MODEL_LEN"


class LimitsConfig(_Strict):
    """Continuous-batching limits."""

    max_num_seqs: int = Field(default=32, ge=1, description="Sequences decoded together at most.")
    max_num_batched_tokens: int = Field(
        default=512, ge=16, description="Prompt tokens prefilled per step per model, so running streams never stall."
    )
    max_waiting: int = Field(
        default=256, ge=0, description="Sequences (prompts x n) that may wait beyond the free batch slots; past it "
        "requests are refused (429), and one needing more than max_num_seqs + max_waiting is a 400.",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Cap on prompt + completion tokens (default: the smallest model's limit)."
    )
    allow_long_max_model_len: bool = Field(
        default=False, description=f"Serve a max_model_len past a model's context with a warning instead of refusing "
        f"to start ({ALLOW_LONG_MAX_MODEL_LEN_ENV}; vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN): for RoPE models whose "
        "config states less than they were stretched to; positions past a learned table fail.",
    )
    max_logprobs: int = Field(
        default=DEFAULT_MAX_LOGPROBS, ge=-1, description="The most alternatives a request may ask for per token "
        "(logprobs, top_logprobs, prompt_logprobs, model_logprobs; vLLM's --max-logprobs); -1: the whole vocabulary, "
        "which a request then asks for with -1. max_logprob_entries still bounds each answer.",
    )
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs", description="Order of the waiting queue: fcfs (arrival) or priority (a request's priority, "
        "lower first, then arrival; vLLM's: a more urgent request preempts the least urgent running one, which "
        "resumes by recomputation). Under fcfs a request with a priority other than 0 is a 400.",
    )
    request_timeout_s: float | None = Field(default=None, gt=0, description="End a request after this long.")
    grammar_compile_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest a request waits for its output constraint (JSON schema, regex, "
        "grammar) to compile: still compiling then is a 400, not started (others' grammars first) a 429.",
    )
    grammar_cache_mb: int = Field(
        default=256, ge=0, description="Memory for compiled output constraints (estimated from their size), "
        "least recently used dropped first.",
    )

    @model_validator(mode="before")
    @classmethod
    def _environment_wins(cls, data: Any) -> Any:
        if isinstance(data, dict) and os.environ.get(ALLOW_LONG_MAX_MODEL_LEN_ENV):
            return {**data, "allow_long_max_model_len": os.environ[ALLOW_LONG_MAX_MODEL_LEN_ENV]}
        return data


CPU_THREADS_ENV = "PROXY_SERVE_CPU_THREADS"
FAST_DECODE_ENV = "PROXY_SERVE_FAST_DECODE"
PACKED_WEIGHTS_ENV = "PROXY_SERVE_PACKED_WEIGHTS"
ENGINE_PROCESS_ENV = "PROXY_SERVE_ENGINE_PROCESS"
ENFORCE_EAGER_ENV = "PROXY_SERVE_ENFORCE_EAGER"
LORA_MODE_ENV = "PROXY_SERVE_LORA_MODE"
DECODE_EXECUTOR_ENV = "PROXY_SERVE_DECODE_EXECUTOR"
KV_CACHE_MEMORY_ENV = "PROXY_SERVE_KV_CACHE_MEMORY"


class RuntimeConfig(_Strict):
    """Process-level performance knobs. Each may also be set by its environment variable (named in its
    description), which wins over the file, as every ``PROXY_SERVE_*`` variable does."""

    cpu_threads: int | None = Field(
        default=None, ge=1, description=f"Intra-op threads for models on the CPU ({CPU_THREADS_ENV}); default: "
        "OMP_NUM_THREADS when the deployer set it, else one core fewer than this process may use.",
    )
    fast_decode: bool = Field(
        default=True,
        description=f"Decode steps of architecture.py's families skip transformers' module stack ({FAST_DECODE_ENV}).",
    )
    packed_weights: bool | None = Field(
        default=None, description=f"oneDNN-packed copies of the linear weights for CPU float32 decode "
        f"({PACKED_WEIGHTS_ENV}); default: when the copies take at most a tenth of the memory.",
    )
    engine_process: bool = Field(
        default=True, description=f"Run the engine core (the step loop) in its own process, away from the HTTP "
        f"server's GIL ({ENGINE_PROCESS_ENV}); its intra-op team then defaults to every core. See bench/NOTES.md.",
    )
    enforce_eager: bool = Field(
        default=False, description=f"Decode without CUDA graphs ({ENFORCE_EAGER_ENV}; vLLM's --enforce-eager): the "
        "same static-buffer step, run eagerly. See docs/gpu.md.",
    )
    decode_executor: Literal["auto", "static", "fast", "transformers"] = Field(
        default="auto", description=f"How models decode ({DECODE_EXECUTOR_ENV}): auto (static buffers and CUDA "
        "graphs on CUDA, the fast path on the CPU), or one of static / fast / transformers for every model.",
    )
    lora_mode: Literal["auto", "unmerged", "merged"] = Field(
        default="auto", description=f"How a LoRA expert over its anti-expert's checkpoint is served ({LORA_MODE_ENV}; "
        "proxy_engine/lora.py): unmerged runs it over the anti-expert's weights (one copy of the small model); "
        "merged merges it into a copy at load; auto is unmerged where the fast step decodes (both models' rows "
        "then read the weights once per step) and merged where the static CUDA-graph step does (each model in "
        "its own graph: unmerged saves the copy's memory, not a read).",
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="The share of each GPU's total memory the server may fill (vLLM's "
        "--gpu-memory-utilization), counting what is in use at start-up (weights, other processes): the static K/V "
        "buffers, the prefix caches and the weights spread over a device list are sized within it. Default: all "
        "the free memory (the K/V within KV_MEMORY_FRACTION of it). See docs/gpu.md.",
    )
    kv_cache_memory: int | None = Field(
        default=None, ge=1, description=f"The most K/V memory the growable caches of each device hold together "
        f"({KV_CACHE_MEMORY_ENV}; vLLM's --kv-cache-memory-bytes), in bytes or a size such as '4GiB': past it the "
        "batch is preempted or a prefill waits, as on running out of memory. Default: on the CPU, "
        "VLLM_CPU_KVCACHE_SPACE GiB when set, else 40% of the RAM available once the weights are in (the OS's OOM "
        "killer would end the process, not an exception); none on a GPU. See docs/reliability.md.",
    )

    @model_validator(mode="before")
    @classmethod
    def _environment_wins(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        names = {"cpu_threads": CPU_THREADS_ENV, "fast_decode": FAST_DECODE_ENV, "packed_weights": PACKED_WEIGHTS_ENV,
                 "engine_process": ENGINE_PROCESS_ENV, "enforce_eager": ENFORCE_EAGER_ENV,
                 "decode_executor": DECODE_EXECUTOR_ENV, "lora_mode": LORA_MODE_ENV,
                 "kv_cache_memory": KV_CACHE_MEMORY_ENV}
        return {**data, **{key: os.environ[var] for key, var in names.items() if os.environ.get(var)}}

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        from proxy_engine.memory import parse_size  # memory.py reads the model configs defined here

        return value if value is None or isinstance(value, int) else parse_size(value)


class PrefixCacheConfig(_Strict):
    """Reuse of prompt prefixes across requests (each model caches its own rendering of the prompt)."""

    enabled: bool = Field(default=True, description="Reuse cached K/V of prompt prefixes seen before.")
    block_size: int = Field(
        default=16, ge=1, le=4096, description="Tokens per cached block: prefixes are reused in whole blocks."
    )
    memory_fraction: float = Field(
        default=0.25, gt=0, le=4,
        description="Each model's cache budget, as a share of its KV cache at the limits (max_num_seqs x "
                    "max_model_len tokens); least recently used blocks are evicted past it.",
    )


class EngineConfig(_Strict):
    base: ModelConfig
    experts: list[ExpertPairConfig] = Field(default_factory=list)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    prefix_cache: PrefixCacheConfig = Field(default_factory=PrefixCacheConfig)
    transcript_template: str = Field(
        default=DEFAULT_TRANSCRIPT_TEMPLATE,
        description="Jinja template that renders chat messages as plain text for 'plain' models.",
    )
    seed: int = Field(default=0, description="Seeds requests that bring no seed of their own (reproducible runs).")
    tool_call_format: Literal[
        "auto", "hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "granite", "gemma4", "olmo3"] = Field(
        default="auto",
        description="How this family writes tool calls (parsed from answers to tool_choice 'auto', written into "
        "plain transcripts): 'auto' detects it from the chat template ([TOOL_CALLS]: mistral, a pythonic example "
        "call [func_name1(params_name1=...)]: pythonic, <function=...><parameter=...>: qwen3_coder, <|tool_call|>: "
        "granite, <|tool_call>: gemma4, <function_calls>: olmo3, <|python_tag|>: llama3_json, else hermes "
        "<tool_call>).",
    )
    generation_config: str = Field(
        default="auto",
        description="Default sampling parameters for requests that omit them (vLLM's --generation-config): 'auto' "
        "reads each model's generation_config.json (the expert's for the proxy-tuned model), 'vllm' or 'none' "
        "uses none, or a folder holding a generation_config.json (proxy_engine/sampling_defaults.py).",
    )
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _resolve_adapters(self) -> EngineConfig:
        """Experts given as adapters over their anti-expert, and every adapter found (proxy_engine/adapter.py)."""
        from proxy_engine.adapter import resolve_model, resolve_pair

        self.base = resolve_model(self.base, "base")
        self.experts = [resolve_pair(pair, i) for i, pair in enumerate(self.experts)]
        return self

    @model_validator(mode="after")
    def _distinct_pair_names(self) -> EngineConfig:
        names = [pair.name for pair in self.experts if pair.name is not None]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"expert pair name {repeated[0]!r} is given to several pairs: each names one model id")
        unnamed = [str(i) for i, pair in enumerate(self.experts) if not pair.in_default and pair.name is None]
        if unnamed:
            raise ValueError(f"experts.{unnamed[0]}: a pair left out of the default combination (in_default: false) "
                             "is served only under its own name: give it a name")
        return self

    @field_validator("tool_call_format", mode="before")
    @classmethod
    def _tool_parser_alias(cls, value: Any) -> Any:
        """vLLM's other names for the same formats: Llama 4's JSON and pythonic parsers read what Llama 3's and the
        pythonic one read (an optional <|python_start|> is part of the pythonic format)."""
        return TOOL_PARSER_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("generation_config")
    @classmethod
    def _generation_config_folder(cls, value: str) -> str:
        if value in ("auto", "vllm", "none"):
            return value
        if not (Path(value).expanduser() / "generation_config.json").is_file():
            raise ValueError(f"{value!r} is not a folder holding a generation_config.json (or use auto, vllm, none)")
        return value

    @property
    def default_alphas(self) -> list[float]:
        return [pair.alpha for pair in self.experts]

    @property
    def default_pairs(self) -> list[int]:
        """The pairs that steer the default proxy-tuned model (``in_default``), by index."""
        return [index for index, pair in enumerate(self.experts) if pair.in_default]
