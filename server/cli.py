"""``proxy-serve``: load the settings (file < environment < flags), build the engine and app, run uvicorn.

The flags are a thin layer over ``ServerSettings``: each one names the settings key it sets, argparse only
collects strings, and the pydantic model validates them, so a bad flag and a bad YAML value get the same
one-line message naming the key.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.settings import ENV_PREFIX, ConfigError, ServerSettings, deep_merge, describe_error, load_settings

logger = logging.getLogger("proxy_serve")

_PAIR = ("engine", "experts", 0)


@dataclass(frozen=True)
class Flag:
    option: str
    key: tuple[str | int, ...]  # where the value goes in the settings
    help: str
    metavar: str = "VALUE"
    action: str = "store"  # "store", "append" (repeatable), "extend" (one or more values), "store_true", "store_false"
    split_commas: bool = False
    aliases: tuple[str, ...] = ()  # vLLM's spellings of the same flag


FLAGS = [
    Flag("--base", ("engine", "base", "path"), "Base model: a local directory, a hub id already cached, or a GGUF "
         "file (or a directory holding one; the gguf extra). --model is vLLM's name for it.", "PATH_OR_ID",
         aliases=("--model",)),
    Flag("--expert", (*_PAIR, "expert", "path"), "Expert (the small fine-tuned model, or its LoRA adapter); "
         "repeated, one expert pair each (a single --anti-expert then serves them all, loaded once).", "PATH_OR_ID",
         action="append"),
    Flag("--anti-expert", (*_PAIR, "anti_expert", "path"), "Anti-expert (the expert before tuning); once for every "
         "pair, or once per --expert.", "PATH_OR_ID", action="append"),
    Flag("--alpha", (*_PAIR, "alpha"), "Default alpha of the pairs (requests may override; 0 = base alone); once "
         "for every pair, or once per --expert.", "FLOAT", action="append"),
    Flag("--expert-name", (*_PAIR, "name"), "Also serve this pair alone, as model ids NAME:PAIR_NAME (the base "
         "steered by this pair only) and NAME:PAIR_NAME:expert (its expert alone), which a chat frontend's model "
         "picker can choose; once per --expert.", "PAIR_NAME", action="append"),
    Flag("--allow-runtime-lora-updating", ("allow_runtime_lora_updating",),
         "Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's; VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
         "does the same): each adapter an expert pair over a checkpoint the server runs, served under its name.",
         action="store_true"),
    Flag("--lora-resolver-dir", ("lora_resolver_dir",), "Load a LoRA adapter on first use: a request naming a model "
         "not served, NAME, loads DIR/NAME as the adapter NAME (vLLM's filesystem resolver, "
         "VLLM_LORA_RESOLVER_CACHE_DIR).", "DIR"),
    Flag("--max-cpu-loras", ("max_cpu_loras",), "At most N adapters loaded while serving (/v1/load_lora_adapter, "
         "--lora-resolver-dir) in memory: one more evicts the least recently used, which loads again on its next "
         "request (vLLM's LoRA cache size).", "N"),
    Flag("--lora-modules", ("lora_modules",), "LoRA adapters served beside the expert pairs, each under its name "
         "(vLLM's): NAME=PATH or JSON, one or more. Each is a pair over the running checkpoint it was trained over "
         "(the anti-expert, else the base), out of the default combination.", "NAME=PATH", action="extend"),
    Flag("--enforce-eager", ("engine", "runtime", "enforce_eager"),
         "Decode without CUDA graphs (the same static-buffer step, run eagerly; vLLM's name).", action="store_true"),
    Flag("--gpu-memory-utilization", ("engine", "runtime", "gpu_memory_utilization"),
         "Share of each GPU's total memory this server may fill, counting what is in use at start (vLLM's; default: "
         "all the free memory). The static K/V buffers, prefix caches and weights over a device list fit in it.",
         "FRACTION"),
    Flag("--kv-cache-memory", ("engine", "runtime", "kv_cache_memory"),
         "Most K/V memory the growable caches of each device hold together, in bytes or a size such as 4GiB "
         "(vLLM's --kv-cache-memory-bytes): past it the batch is preempted or prefills wait. Default: on the CPU, "
         "VLLM_CPU_KVCACHE_SPACE GiB when set, else 40%% of the RAM available once the weights are in.", "SIZE",
         aliases=("--kv-cache-memory-bytes",)),
    Flag("--lora-mode", ("engine", "runtime", "lora_mode"),
         "auto (default), unmerged or merged: a LoRA expert run over its anti-expert's weights, or merged into a "
         "copy of them (auto: unmerged except under the static CUDA-graph step).", "MODE"),
    Flag("--base-device", ("engine", "base", "device"), "Device of the base: cpu, cuda:N, auto, or cuda:0,cuda:1.",
         "DEVICE", split_commas=True),
    Flag("--base-dtype", ("engine", "base", "dtype"), "dtype of the base: auto, float32, bfloat16, float16.", "DTYPE"),
    Flag("--base-prompt-format", ("engine", "base", "prompt_format"), "plain or chat.", "FORMAT"),
    Flag("--expert-device", (*_PAIR, "expert", "device"), "Device of the expert.", "DEVICE", split_commas=True),
    Flag("--expert-dtype", (*_PAIR, "expert", "dtype"), "dtype of the expert.", "DTYPE"),
    Flag("--expert-adapter", (*_PAIR, "expert", "adapter"), "A PEFT adapter (LoRA...) over the expert's "
         "weights; --expert may also name the adapter itself, over the anti-expert.", "ADAPTER"),
    Flag("--expert-prompt-format", (*_PAIR, "expert", "prompt_format"),
         "plain or chat (a chat expert sees chat requests in its own chat template).", "FORMAT"),
    Flag("--anti-expert-device", (*_PAIR, "anti_expert", "device"), "Device of the anti-expert.", "DEVICE",
         split_commas=True),
    Flag("--anti-expert-dtype", (*_PAIR, "anti_expert", "dtype"), "dtype of the anti-expert.", "DTYPE"),
    Flag("--base-tools-preamble", ("engine", "base", "tools_preamble"), "Write a request's tools into the base's "
         "system message when its chat template ignores them (docs/gguf.md).", action="store_true"),
    Flag("--expert-tools-preamble", (*_PAIR, "expert", "tools_preamble"), "The same for the expert.",
         action="store_true"),
    Flag("--served-model-name", ("served_model_name",), "Model id clients use (default proxy-tuned); "
         "'<name>:base' and '<name>:expert' serve the parts alone. More names (vLLM's) are aliases: answers and "
         "metrics use the first.", "NAME", action="extend"),
    Flag("--host", ("host",), "Address to listen on (default 127.0.0.1; 0.0.0.0 for every interface).", "HOST"),
    Flag("--port", ("port",), "Port to listen on (default 8000).", "PORT"),
    Flag("--ssl-keyfile", ("ssl_keyfile",), "Serve HTTPS with this PEM private key (with --ssl-certfile).", "FILE"),
    Flag("--ssl-certfile", ("ssl_certfile",), "The PEM certificate for --ssl-keyfile.", "FILE"),
    Flag("--root-path", ("root_path",), "Path prefix a reverse proxy serves the app under (ASGI root_path).",
         "PATH"),
    Flag("--api-key", ("api_keys",), "Accept this Bearer key (repeatable); without any, no key is needed.", "KEY",
         action="append"),
    Flag("--api-keys-file", ("api_keys_file",), "Accept the Bearer keys in this file, one per line (a mounted "
         "secret; the keys stay out of the command line and the environment).", "FILE"),
    Flag("--allowed-origins", ("allowed_origins",), "CORS origins allowed to call from a browser "
         "(comma-separated or repeated; '*' for any).", "ORIGINS", action="append", split_commas=True),
    Flag("--max-num-seqs", ("engine", "limits", "max_num_seqs"), "Sequences decoded together at most.", "N"),
    Flag("--max-waiting", ("engine", "limits", "max_waiting"),
         "Sequences (prompts x n) that may wait beyond the free batch slots; past it new requests get 429 "
         "(a request needing more than max-num-seqs + max-waiting at once is a 400).", "N"),
    Flag("--scheduling-policy", ("engine", "limits", "scheduling_policy"),
         "fcfs (default: arrival order) or priority (requests' priority field, lower first, preempting less "
         "urgent running requests; vLLM's).",
         "fcfs|priority"),
    Flag("--max-num-batched-tokens", ("engine", "limits", "max_num_batched_tokens"),
         "Prompt tokens prefilled per step per model (default 512), so running streams never stall.", "N"),
    Flag("--max-logprobs", ("engine", "limits", "max_logprobs"), "The most alternatives per token a request may "
         "ask for (default 20; -1: the whole vocabulary, asked for with -1; vLLM's).", "N"),
    Flag("--max-model-len", ("engine", "limits", "max_model_len"), "Cap on prompt + completion tokens.", "N"),
    Flag("--no-prefix-caching", ("engine", "prefix_cache", "enabled"),
         "Compute every prompt in full (by default, prompt prefixes seen before are reused).", action="store_false",
         aliases=("--no-enable-prefix-caching",)),
    Flag("--enable-prefix-caching", ("engine", "prefix_cache", "enabled"), "Reuse prompt prefixes seen before (the "
         "default; vLLM's flag).", action="store_true"),
    Flag("--block-size", ("engine", "prefix_cache", "block_size"), "Tokens per prefix-cache block (default 16; "
         "vLLM's name).", "N"),
    Flag("--prefix-cache-fraction", ("engine", "prefix_cache", "memory_fraction"),
         "Each model's prefix-cache budget, as a share of its KV cache at the limits (default 0.25).", "FRACTION"),
    Flag("--request-timeout", ("engine", "limits", "request_timeout_s"),
         "End a request after this many seconds (504, or an error event with code timeout).", "SECONDS"),
    Flag("--grammar-compile-timeout", ("engine", "limits", "grammar_compile_timeout_s"),
         "Longest a request waits for its JSON schema / regex / grammar to compile (default 5; 400 past it).",
         "SECONDS"),
    Flag("--grammar-cache-mb", ("engine", "limits", "grammar_cache_mb"),
         "Memory for compiled output constraints (default 256 MB).", "MB"),
    Flag("--shutdown-grace", ("shutdown_grace_s",),
         "On SIGTERM, let running requests finish for up to this many seconds (default 30), then exit 0.",
         "SECONDS"),
    Flag("--max-body-bytes", ("max_body_bytes",), "Largest request body accepted (default 4 MiB; 413 past it).",
         "BYTES"),
    Flag("--generation-config", ("engine", "generation_config"),
         "Default sampling parameters for requests that omit them: auto (each model's generation_config.json; "
         "the expert's for the proxy-tuned model), vllm or none (no defaults), or a folder holding one.",
         "auto|vllm|none|FOLDER"),
    Flag("--tool-call-parser", ("engine", "tool_call_format"), "How the family writes tool calls, parsed from "
         "answers to tool_choice auto: auto (from the chat template), hermes, llama3_json, mistral, pythonic, "
         "qwen3_coder, granite, gemma4 or olmo3 (vLLM's names; its llama4_json and llama4_pythonic are read as "
         "llama3_json and pythonic).",
         "auto|hermes|llama3_json|mistral|pythonic|qwen3_coder|granite|gemma4|olmo3"),
    Flag("--seed", ("engine", "seed"), "Seeds the requests that bring no seed (reproducible runs; default 0).", "N"),
    Flag("--reasoning-parser", ("reasoning_parser",), "Move <think> ... </think> out of chat answers into "
         "reasoning_content: deepseek_r1 (the template opens the block: R1 and its distills), qwen3 (the model "
         "opens it), mistral ([THINK] ... [/THINK]) or gemma4 (<|channel>thought ... <channel|>), both opened by the "
         "model, olmo3 (read as deepseek_r1) or granite (Granite 3.2's \"Here is my thought process:\" headings). "
         "vLLM's names.", "deepseek_r1|qwen3|mistral|gemma4|olmo3|granite"),
    Flag("--disable-log-requests", ("log_requests",), "Log lines only for the requests refused, failed or cut off, "
         "not for every one served (vLLM's flag).", action="store_false"),
    Flag("--log-prompts", ("log_prompts",), "Write prompt text in the per-request log lines (off by default).",
         action="store_true"),
    Flag("--log-level", ("log_level",), "debug, info, warning or error (default info).", "LEVEL"),
    Flag("--revision", ("engine", "base", "revision"), "The base's revision: a branch, tag or commit of its hub id, "
         "already in the hub cache (vLLM's).", "REVISION"),
    Flag("--tokenizer", ("engine", "base", "tokenizer"), "A tokenizer directory or cached hub id for the base "
         "instead of its own (vLLM's); the pair's tokenizers must agree with it.", "PATH_OR_ID"),
    Flag("--uvicorn-log-level", ("uvicorn_log_level",), "Uvicorn's own log level: critical, error, warning, info, "
         "debug or trace (default: --log-level; vLLM's).", "LEVEL"),
    Flag("--max-log-len", ("max_log_len",), "With --log-prompts, the most characters of each prompt text (or ids of "
         "a token-id prompt) a log line holds (vLLM's; default all).", "N"),
    Flag("--disable-fastapi-docs", ("fastapi_docs",), "Serve no /docs, /redoc or /openapi.json (vLLM's).",
         action="store_false"),
    Flag("--return-tokens-as-token-ids", ("return_tokens_as_token_ids",), "Name logprob tokens token_id:<id> "
         "unless a request says otherwise (vLLM's).", action="store_true"),
    Flag("--disable-frontend-multiprocessing", ("engine", "runtime", "engine_process"), "Run the engine core in the "
         "HTTP server's process rather than its own (vLLM's).", action="store_false"),
]

# vLLM's flags that ask for nothing this server does not do anyway: accepted, so that a vLLM command line runs.
# The number is how many values the flag takes (0: a switch).
VLLM_NO_OPS = {
    "--enable-request-id-headers": (0, "Every answer carries x-request-id."),
    "--disable-uvicorn-access-log": (0, "Uvicorn writes no access log; the server writes one line per request "
                                        "(--disable-log-requests)."),
    "--swap-space": (1, "Preempted sequences are recomputed, never swapped to the CPU."),
    "--enable-lora": (0, "An expert may be a LoRA adapter without a switch (--expert ADAPTER)."),
    "--max-lora-rank": (1, "Any rank is served."),
    "--max-loras": (1, "Every expert pair is served at once."),
    "--disable-custom-all-reduce": (0, "No tensor parallelism is done here."),
    "--distributed-executor-backend": (1, "One process per server (--disable-frontend-multiprocessing)."),
    "--hf-token": (1, "Nothing is downloaded: models come from disk or the hub cache."),
}

# vLLM's flags that would change what is served: accepted with these values (vLLM's defaults, or what is done
# here anyway), refused otherwise with what to do instead.
VLLM_REFUSED = {
    "--quantization": ((), "quantized checkpoints are not loaded here: serve an unquantized one, a GGUF file "
                           "(dequantized once at load; docs/gguf.md), or quantize at load with bitsandbytes "
                           "(quantization: 8bit or 4bit on a model in the config file)"),
    "--kv-cache-dtype": (("auto",), "the K/V cache is kept in each model's dtype (--dtype)"),
    "--load-format": (("auto", "safetensors", "pt"), "models load through transformers (safetensors or .bin), or "
                                                     "from a GGUF file named as the model"),
    "--download-dir": ((), "nothing is downloaded; to read hub ids from another cache, set HF_HUB_CACHE"),
    "--speculative-config": ((), "speculative decoding is not done here"),
    "--middleware": ((), "no ASGI middleware is loaded from the command line"),
    "--response-role": (("assistant",), "chat answers come from the assistant role"),
    "--chat-template-content-format": (("auto", "string"), "message content parts are joined into one string for "
                                                          "the template"),
}

EPILOG = f"""\
With no arguments at all, serves a built-in demo family. With --base/--expert/--anti-expert alone, serves that
triple on the CPU without a config file. Precedence: flags > environment ({ENV_PREFIX}*, nested keys joined
by '__', e.g. {ENV_PREFIX}ENGINE__LIMITS__MAX_NUM_SEQS=8) > --config file > defaults.

Model ids: NAME (proxy-tuned), NAME:base (the base alone), NAME:expert (the expert alone), and for each pair
named with --expert-name, NAME:PAIR_NAME (that pair alone) and NAME:PAIR_NAME:expert. A request may send "alpha"
(a number, or a list with one value per expert pair) to set the strength; 0 is the base alone.

proxy-serve run-batch -i BATCH.jsonl -o OUT.jsonl [these flags]: run an OpenAI batch file offline (vLLM's run-batch).
See docs/server.md for the full configuration reference."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxy-serve",
        description="OpenAI-compatible server for proxy-tuned models: base + alpha * (expert - anti-expert).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", metavar="BASE",
                        help="The base model, as `vllm serve MODEL` takes it (the same as --base).")
    parser.add_argument("--config", metavar="FILE", help="YAML settings file (see docs/server.md).")
    parser.add_argument("--check", action="store_true",
                        help="Validate the configuration and the models' placement without loading weights: print "
                             "the settings (keys hidden) and the placement plan and exit 0, or print the first "
                             "error in one line and exit 1.")
    parser.add_argument("--device", metavar="DEVICE",
                        help="Put every model on this device (cpu, cuda, cuda:N; vLLM's name), whatever the config "
                             "file says; a per-model device flag given with it still wins for that model.")
    parser.add_argument("--dtype", metavar="DTYPE",
                        help="dtype of every model (auto, float32, bfloat16, float16; vLLM's name); a per-model dtype "
                             "flag given with it still wins for that model.")
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="Let every model run the code its repository ships (transformers' trust_remote_code).")
    parser.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE",
                        help="The chat template of every model that reads chat (prompt_format: chat; the expert's): "
                             "a Jinja file, or the template itself (vLLM's flag).")
    vllm = parser.add_argument_group("vLLM command lines", "Accepted so that a vLLM command line runs as it is.")
    vllm.add_argument("--enable-auto-tool-choice", action="store_true",
                      help="tool_choice auto is always on here (see --tool-call-parser).")
    vllm.add_argument("--enable-chunked-prefill", action="store_true",
                      help="Long prompts are always prefilled in chunks (--max-num-batched-tokens per step).")
    vllm.add_argument("--disable-log-stats", action="store_true", help="No periodic stats are logged here.")
    for name, short in PARALLEL_FLAGS.items():
        vllm.add_argument(name, short, type=int, metavar="1",
                          help="1 only: a model too large for one GPU spreads its layers over several with "
                               "--base-device cuda:0,cuda:1 (accelerate's device map).")
    for name, (nargs, why) in VLLM_NO_OPS.items():
        if nargs:
            vllm.add_argument(name, metavar="VALUE", help=f"Accepted: {why}")
        else:
            vllm.add_argument(name, action="store_true", help=f"Accepted: {why}")
    for name, (accepted, why) in VLLM_REFUSED.items():
        vllm.add_argument(name, metavar="VALUE", help=f"{', '.join(accepted) or 'Not'} only: {why}.")
    for flag in FLAGS:
        dest = flag.option[2:].replace("-", "_")
        names = (flag.option, *flag.aliases)
        if flag.action in ("store_true", "store_false"):
            parser.add_argument(*names, dest=dest, action=flag.action, default=None, help=flag.help)
        elif flag.action == "extend":  # vLLM's one-or-more values after the flag
            parser.add_argument(*names, dest=dest, action="extend", nargs="+", metavar=flag.metavar, help=flag.help)
        else:
            parser.add_argument(*names, dest=dest, action=flag.action, metavar=flag.metavar, help=flag.help)
    return parser


# vLLM's model parallelism, which is not done here: refused above 1 with what to do instead.
PARALLEL_FLAGS = {"--tensor-parallel-size": "-tp", "--pipeline-parallel-size": "-pp"}


def refuse_vllm_flags(args: argparse.Namespace) -> None:
    """A vLLM flag that would change what is served, with a value that is not done here: one line saying why and
    what to do instead (rather than argparse's "unrecognized arguments")."""
    for name, (accepted, why) in VLLM_REFUSED.items():
        value = getattr(args, name[2:].replace("-", "_"))
        if value is not None and value not in accepted:
            raise ConfigError(f"{name} {value}: {why}")


def refuse_parallelism(args: argparse.Namespace) -> None:
    for name in PARALLEL_FLAGS:
        size = getattr(args, name[2:].replace("-", "_"))
        if size is not None and size != 1:
            raise ConfigError(f"{name} {size}: tensor and pipeline parallelism are not done here; a model too large "
                              "for one GPU spreads its layers over several with --base-device cuda:0,cuda:1 "
                              "(accelerate's device map), and the expert pair may sit on another GPU "
                              "(docs/deployment.md)")


def _nest(key: tuple[str | int, ...], value: Any) -> Any:
    """``(engine, experts, 0, alpha), 2`` -> ``{"engine": {"experts": [{"alpha": 2}]}}``; at index 1,
    ``[{}, {"alpha": 2}]`` (merged index by index: the first pair untouched)."""
    for part in reversed(key):
        value = [*([{}] * part), value] if isinstance(part, int) else {part: value}
    return value


# The flags that repeat per expert pair: given once, a value is every pair's.
PAIR_FLAGS = ("expert", "anti_expert", "alpha", "expert_name")


def pair_count(args: argparse.Namespace) -> int:
    """How many expert pairs the command line names: each of ``PAIR_FLAGS`` given once, or as often as the
    others (``--expert A --expert B --anti-expert C``: two pairs over one anti-expert)."""
    counts = {name: len(getattr(args, name) or []) for name in PAIR_FLAGS}
    pairs = max(counts.values())
    wrong = [f"--{name.replace('_', '-')} {n} times" for name, n in counts.items() if n not in (0, 1, pairs)]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} for {pairs} expert pairs: give each of --expert, --anti-expert and "
                          "--alpha once (for every pair) or once per pair")
    return pairs


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    pairs = pair_count(args)
    for flag in FLAGS:
        name = flag.option[2:].replace("-", "_")
        value = getattr(args, name)
        if value is None:
            continue
        if flag.split_commas:
            items = value if isinstance(value, list) else [value]
            parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
            value = parts if (isinstance(value, list) or len(parts) > 1) else parts[0] if parts else value
        if flag.key[: len(_PAIR)] != _PAIR:
            overrides = deep_merge(overrides, _nest(flag.key, value))
            continue
        # A pair's flag: the n-th value for pair n (PAIR_FLAGS), or one value for every pair the line names.
        for index in range(max(pairs, 1)):
            one = value[index if len(value) > 1 else 0] if name in PAIR_FLAGS else value
            overrides = deep_merge(overrides, _nest(("engine", "experts", index, *flag.key[len(_PAIR):]), one))
    return overrides


def resolve_settings(argv: list[str] | None = None) -> tuple[ServerSettings, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    refuse_parallelism(args)
    refuse_vllm_flags(args)
    if args.model is not None:
        if args.base not in (None, args.model):
            raise ConfigError(f"the base is given twice: {args.model} (the first argument) and --base {args.base}")
        args.base = args.model
    from server.demo import default_engine_config

    settings = load_settings(args.config, overrides_from_args(args), default_engine=default_engine_config)
    return with_every_model(settings, args), args


# vLLM's flags for the one model it serves, which here set every model; a model's own flag still wins for it.
EVERY_MODEL_FLAGS = ("device", "dtype", "trust_remote_code", "chat_template")


def with_every_model(settings: ServerSettings, args: argparse.Namespace) -> ServerSettings:
    """``--device`` / ``--dtype`` / ``--trust-remote-code`` on every model, but for the models whose own flag was
    given too; ``--chat-template`` (a file, or the template) on every model that reads chat."""
    given = {name: getattr(args, name) for name in EVERY_MODEL_FLAGS if getattr(args, name, None) is not None}
    if not given:
        return settings
    if "chat_template" in given:
        path = Path(given["chat_template"]).expanduser()
        given["chat_template"] = path.read_text() if path.is_file() else given["chat_template"]
    engine = settings.engine.model_dump()
    places = [("base",)] + [("experts", i, role) for i in range(len(engine["experts"]))
                            for role in ("expert", "anti_expert")]
    chat_models = 0
    for place in places:
        model = engine
        for part in place:
            model = model[part]
        for name, value in given.items():
            if name == "chat_template":
                if model["prompt_format"] == "chat":
                    model[name], chat_models = value, chat_models + 1
            elif getattr(args, f"{place[-1]}_{name}", None) is None:  # the model's own flag wins
                model[name] = value
    if "chat_template" in given and not chat_models:
        raise ConfigError("--chat-template: no model reads chat (set prompt_format: chat on the expert, "
                          "--expert-prompt-format chat)")
    try:
        return settings.model_copy(update={"engine": type(settings.engine).model_validate(engine)})
    except ValidationError as error:
        flags = " ".join(f"--{name.replace('_', '-')}" + (f" {given[name]}" if name in ("device", "dtype") else "")
                         for name in given)
        raise ConfigError(f"{flags}: {describe_error(error, prefix='engine.')}") from error


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    configure_logging("info")
    argv = sys.argv[1:] if argv is None else argv
    batch = None
    if argv[:1] == ["run-batch"]:  # vLLM's ``vllm run-batch``: a batch file, offline (server/batch.py)
        from server.batch import batch_parser

        batch, argv = batch_parser().parse_known_args(argv[1:])
    try:
        settings, args = resolve_settings(argv)
        settings.api_key_values()  # an unreadable or empty api_keys_file is a configuration error, said here
    except ConfigError as error:
        print(f"proxy-serve: {error}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    if batch is not None:
        from server.batch import run_batch_command

        return run_batch_command(settings, batch.input_file, batch.output_file)
    if args.check:
        from server.check import check

        return check(settings)
    from server.process import exit_now, serve

    exit_now(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
