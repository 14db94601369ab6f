"""Server settings: one pydantic model behind the YAML file, the ``PROXY_SERVE_*`` variables and the CLI flags.

Precedence, highest first: command-line flags, environment variables, the YAML file, the defaults. Every
source is validated by the same model, and ``extra="forbid"`` makes a misspelt key an error that names it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from proxy_engine.config import EngineConfig
from proxy_engine.request import Serves, Target, served_targets
from server.reasoning import ReasoningParser

ENV_PREFIX = "PROXY_SERVE_"
VLLM_RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for the same endpoints
VLLM_LORA_RESOLVER_ENV = "VLLM_LORA_RESOLVER_CACHE_DIR"  # vLLM's filesystem resolver's directory
MIB = 1024 * 1024


def _names_a_whole_model(name: str) -> bool:
    """A served name (the model id, or an alias of it): non-empty, no spaces, not one of its parts' suffixes."""
    return bool(name) and not name.endswith((":base", ":expert")) and not any(c.isspace() for c in name)


class ConfigError(Exception):
    """A configuration problem, described in one line fit to print before exiting."""


class ServerSettings(BaseSettings):
    """Everything ``proxy-serve`` needs: the HTTP side here, the models and limits under ``engine``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    served_model_name: str = Field(
        default="proxy-tuned",
        min_length=1,
        description="Model id of the proxy-tuned model; '<name>:base' and '<name>:expert' name its parts. A list "
                    "(vLLM's --served-model-name with several names): the first is the id, the rest aliases.",
    )
    served_model_aliases: list[str] = Field(
        default_factory=list,
        description="Other names the served model answers to, each with the same parts ('<alias>:base', ...); "
                    "answers name the model by its id, as vLLM's by its first name.",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    ssl_keyfile: str | None = Field(default=None, description="Serve HTTPS with this PEM private key (with "
                                    "ssl_certfile; vLLM's --ssl-keyfile).")
    ssl_certfile: str | None = Field(default=None, description="The PEM certificate (chain) for ssl_keyfile.")
    root_path: str = Field(default="", description="The path prefix a reverse proxy serves this app under (ASGI "
                           "root_path, vLLM's --root-path): the docs page then finds its schema behind the proxy.")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted Bearer keys; empty: no key needed. Never logged."
    )
    api_keys_file: str | None = Field(
        default=None, description="A file of accepted Bearer keys, one per line ('#' comments), e.g. a mounted "
        "Kubernetes or Docker secret. Read where the server starts (each Ray replica reads its own), so the keys "
        "never travel in a config, an environment variable or Ray's job and deployment metadata.",
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="CORS origins allowed to call the API from a browser ('*' for any)."
    )
    max_body_bytes: int = Field(default=4 * MIB, ge=1024, description="Largest request body accepted (413 past it).")
    allowed_hosts: list[str] | None = Field(
        default=None, description="Host header values accepted (names, optionally with ':port'; '*' for any); "
        "a request naming another host gets 403 (DNS-rebinding defence). Default: localhost names only when no "
        "API key is set, any host when one is.",
    )
    max_prompt_chars: int = Field(
        default=MIB, ge=1, description="Characters in one prompt (a prompt string, or all of a chat's message "
        "texts) before it is tokenized; 400 past it.",
    )
    max_request_chars: int = Field(
        default=4 * MIB, ge=1, description="Characters in all the prompts of one request before they are "
        "tokenized; 400 past it.",
    )
    max_logprob_entries: int = Field(
        default=1_000_000, ge=1, description="Log-probability entries one response may hold (each token counts "
        "1 + its top alternatives, over every choice and, with echo, every prompt token); 400 past it.",
    )
    limit_concurrency: int = Field(
        default=512, ge=1, description="Open connections plus running requests at most; past it uvicorn answers "
        "503 at once.",
    )
    timeout_keep_alive_s: float = Field(default=5.0, gt=0, description="An idle keep-alive connection is "
                                        "closed after this long.")
    header_timeout_s: float = Field(default=30.0, gt=0, description="A connection must send a request's "
                                    "headers within this long of opening (or of its last response); else closed.")
    body_timeout_s: float = Field(default=60.0, gt=0, description="Longest wait for the next piece of a "
                                  "request body; 408 past it.")
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, description="Largest request head (request line "
                                  "and headers) read; past it the connection gets 400 and is closed.")
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM: how long running requests may take to finish before they are "
        "ended with a 'shutdown' error (new requests get 503 meanwhile)."
    )
    log_requests: bool = Field(default=True, description="Write a log line per request (--disable-log-requests: "
                               "only for the requests refused, failed or cut off).")
    log_prompts: bool = Field(default=False, description="Include prompt text in the per-request log lines.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log verbosity.")
    uvicorn_log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] | None = Field(
        default=None, description="Uvicorn's own log level (vLLM's --uvicorn-log-level); default: log_level.")
    max_log_len: int | None = Field(default=None, ge=0, description="With log_prompts: the most prompt characters "
                                    "a log line holds (vLLM's --max-log-len); default: all of them.")
    fastapi_docs: bool = Field(default=True, description="Serve /docs, /redoc and /openapi.json (vLLM's "
                               "--disable-fastapi-docs turns them off).")
    return_tokens_as_token_ids: bool = Field(
        default=False, description="Name logprob tokens token_id:<id> in the requests that do not say "
        "(vLLM's --return-tokens-as-token-ids; a request's return_tokens_as_token_ids wins).")
    responses_store_max: int = Field(
        default=1000, ge=0, description="Responses API: stored responses kept in memory for previous_response_id "
        "(the oldest leave first); 0 turns the store off (previous_response_id is then a 400)."
    )
    responses_store_max_mb: int = Field(
        default=256, ge=0, description="Responses API: memory for stored responses, in MB of their JSON (the "
        "oldest leave first); 0 turns the store off."
    )
    cache_salt_per_key: bool = Field(
        default=True, description="Salt the prefix cache with each request's API key, so that requests made with "
        "different keys never share cached prompts (no cross-tenant timing side channel); see docs/security.md."
    )
    responses_store_ttl_s: float = Field(
        default=3600.0, gt=0, description="Responses API: how long a stored response is kept, in seconds."
    )
    reasoning_parser: ReasoningParser | None = Field(
        default=None, description="Move the thinking of reasoning models (<think> ... </think>) out of chat answers "
        "into reasoning_content, as vLLM's --reasoning-parser: 'deepseek_r1' (the template opens the block in the "
        "prompt: DeepSeek-R1 and its distills, Qwen3 Thinking-2507), 'qwen3' (the model opens it: Qwen3's hybrid "
        "models), 'mistral' ([THINK] ... [/THINK], opened by the model: Magistral, Ministral 3 Reasoning) or "
        "'gemma4' (<|channel>thought ... <channel|>), 'olmo3' (read as 'deepseek_r1') or 'granite' (Granite 3.2's "
        "plain-text headings). "
        "Unset: the thinking stays in content (server/reasoning.py).",
    )
    allow_runtime_lora_updating: bool = Field(
        default=False, description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime "
        "LoRA updating, which vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=True turns on too): each adapter an expert pair "
        "over a checkpoint the server runs, served under its name (server/lora_adapters.py). They read files from "
        "this machine's disk: allow them only where the API's clients may.",
    )
    lora_modules: list[str] = Field(
        default_factory=list, description="LoRA adapters served beside the configured pairs, each under its own name "
        "(vLLM's --lora-modules): 'NAME=PATH', or JSON {\"name\": ..., \"path\": ...}. Each is an expert pair out of "
        "the default combination, over the running checkpoint it was trained over (proxy_engine/adapter.py).",
    )
    lora_resolver_dir: str | None = Field(
        default=None, description="A directory of LoRA adapters loaded on first use: a request naming a model this "
        "server does not serve, NAME, loads DIR/NAME as the adapter NAME (as /v1/load_lora_adapter would) and is "
        "answered by it, as vLLM's filesystem resolver (VLLM_LORA_RESOLVER_CACHE_DIR) does. Each replica loads what "
        "its own requests name.",
    )
    max_cpu_loras: int | None = Field(
        default=None, ge=1, description="At most this many adapters loaded while serving (by /v1/load_lora_adapter "
        "or the resolver) held in memory, as vLLM's LoRA cache: one more evicts the least recently used (its running "
        "requests finish), which stays served and loads again on its next request. Unset: no bound. Adapters of "
        "lora_modules are not counted and stay.",
    )
    engine: EngineConfig = Field(description="Models, expert pairs, default alphas and batching limits.")

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value() for key in keys):
            raise ValueError("an API key must not be empty")
        return keys

    @field_validator("lora_resolver_dir")
    @classmethod
    def _a_directory(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).expanduser().is_dir():
            raise ValueError(f"{path} is not a directory")
        return path

    @field_validator("ssl_keyfile", "ssl_certfile")
    @classmethod
    def _readable_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"{path} is not a file")
        return path

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("ssl_keyfile and ssl_certfile go together (HTTPS needs the key and its certificate)")
        return self

    @model_validator(mode="after")
    def _lora_modules_as_pairs(self) -> ServerSettings:
        """Each of ``lora_modules`` as an expert pair over a running checkpoint (once: a settings object validated
        again keeps the pairs it has)."""
        from proxy_engine.adapter import adapter_pair, find_adapter

        added = []
        for module in self.lora_modules:
            name, path = parse_lora_module(module)
            directory = find_adapter(path)
            if directory is None:
                raise ValueError(f"lora_modules: {path} is not a PEFT adapter (a directory holding "
                                 "adapter_config.json, or a hub id cached with one)")
            if any(pair.name == name and pair.expert.adapter == str(directory) for pair in self.engine.experts):
                continue
            try:
                added.append(adapter_pair(self.engine, name, directory))
            except ValueError as error:
                raise ValueError(f"lora_modules: {name}: {error}") from None
        if added:
            self.engine = EngineConfig.model_validate({**dict(self.engine), "experts": [*self.engine.experts, *added]})
        return self

    @model_validator(mode="before")
    @classmethod
    def _names_as_id_and_aliases(cls, values: Any) -> Any:
        """vLLM's ``--served-model-name A B``: A is the model id, B an alias."""
        if isinstance(values, dict) and isinstance(values.get("served_model_name"), list | tuple):
            names = [str(name) for name in values["served_model_name"]]
            if not names:
                raise ValueError("served_model_name: give at least one name")
            values = {**values, "served_model_name": names[0],
                      "served_model_aliases": [*names[1:], *values.get("served_model_aliases", [])]}
        return values

    @field_validator("served_model_name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _names_a_whole_model(name):
            raise ValueError("must not contain spaces or end in ':base' / ':expert'")
        return name

    @field_validator("served_model_aliases")
    @classmethod
    def _plain_aliases(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _names_a_whole_model(name):
                raise ValueError(f"{name!r}: an alias must not be empty, contain spaces or end in ':base' / ':expert'")
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _aliases_apart(self) -> ServerSettings:
        if self.served_model_name in self.served_model_aliases:
            raise ValueError(f"served_model_aliases: {self.served_model_name!r} is the model id itself")
        # A pair's bare name is a model id of its own (the base steered by that pair alone): a served name equal to
        # it would answer for the whole model and hide the pair without a word.
        for pair in self.engine.experts:
            if pair.name is not None and self.names_of_model(pair.name):
                raise ValueError(f"expert pair {pair.name!r} has the name the served model answers to: rename the "
                                 "pair (expert name, or the NAME of NAME=PATH) or the model")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges file, environment and flags itself (the experts list merges by index, which
        # pydantic-settings' own merge cannot do), so constructing the model reads only what it is given.
        return (init_settings,)

    def api_key_values(self) -> list[str]:
        """Every accepted key: ``api_keys`` and those of ``api_keys_file`` (read now; ``ConfigError`` if it cannot
        be read or holds no key)."""
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_keys_file:
            keys += read_key_file(self.api_keys_file)
        return keys

    @property
    def has_keys(self) -> bool:
        return bool(self.api_keys or self.api_keys_file)

    @property
    def model_routes(self) -> dict[str, Target]:
        """Each model id this server answers to, and what it serves, in the order ``/v1/models`` lists them: NAME
        (proxy-tuned), NAME:base, NAME:expert (the first pair's expert), then for each named expert pair NAME:PAIR
        (the base steered by that pair alone) and NAME:PAIR:expert (its expert alone)."""
        return {self.model_id(target): target for target in served_targets(self.engine)}

    def canonical_model(self, model: str) -> str:
        """``model`` with an alias of the served model (or of one of its parts: ``<alias>:base``) replaced by the
        model id; any other name as it is."""
        for alias in self.served_model_aliases:
            if model == alias or model.startswith(f"{alias}:"):
                return self.served_model_name + model[len(alias):]
        return model

    def names_of_model(self, name: str) -> bool:
        """Whether ``name`` is the served model's id or one of its aliases (no adapter may take it)."""
        return name == self.served_model_name or name in self.served_model_aliases

    def model_id(self, target: Target) -> str:
        suffix = "" if target.serves is Serves.PROXY else f":{target.serves.value}"
        if target.pair is None:
            return f"{self.served_model_name}{suffix}"
        return f"{self.served_model_name}:{self.engine.experts[target.pair].name}{suffix}"

    @property
    def model_ids(self) -> list[str]:
        return list(self.model_routes)

    def pair_named(self, name: str) -> int | None:
        """The index of the expert pair named ``name`` (``--expert-name``), or None."""
        return next((index for index, pair in enumerate(self.engine.experts) if pair.name == name), None)

    def model_for_adapter(self, adapter_id: str) -> str | None:
        """The model id a TGI ``adapter_id`` names: a served id, or a named pair by its name or by its expert's path
        or adapter (what TGI's clients send for a LoRA adapter it serves); None when it names nothing served."""
        if (served := self.canonical_model(adapter_id)) in self.model_routes:
            return served
        for index, pair in enumerate(self.engine.experts):
            if pair.name is not None and adapter_id in (pair.name, pair.expert.path, pair.expert.adapter):
                return self.model_id(Target(Serves.PROXY, index))
        return None


def parse_lora_module(module: str) -> tuple[str, str]:
    """vLLM's ``--lora-modules`` item: ``NAME=PATH``, or JSON with ``name`` and ``path`` (its ``base_model_name``
    names vLLM's served model, of which there is one here)."""
    text = module.strip()
    if text.startswith("{"):
        try:
            fields = json.loads(text)
            return str(fields["name"]), str(fields["path"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"lora_modules: {text[:200]!r} is not JSON with a name and a path") from None
    name, equals, path = text.partition("=")
    if not equals or not name or not path:
        raise ValueError(f"lora_modules: {text[:200]!r} is not NAME=PATH")
    return name, path


def read_key_file(path: str | Path) -> list[str]:
    """The keys of a key file: one per line, blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read api_keys_file {str(path)!r}: {getattr(error, 'strerror', None) or error}") \
            from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"api_keys_file {str(path)!r} holds no key")
    return keys


def deep_merge(base: Any, override: Any) -> Any:
    """Merge ``override`` into ``base``: dicts key by key, lists of dicts index by index, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and all(isinstance(x, dict) for x in override):
        merged_list = list(base)
        for i, value in enumerate(override):
            if i < len(merged_list):
                merged_list[i] = deep_merge(merged_list[i], value)
            else:
                merged_list.append(value)
        return merged_list
    return override


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, not {type(data).__name__}")
    return data


def read_environment() -> dict[str, Any]:
    """``PROXY_SERVE_*`` variables as a nested dict (``PROXY_SERVE_ENGINE__LIMITS__MAX_NUM_SEQS=4``)."""
    return EnvSettingsSource(ServerSettings)()


def describe_error(error: ValidationError, prefix: str = "") -> str:
    """One line naming every offending key, e.g. ``engine.limits.max_num_seq: unknown key`` (``prefix``: where the
    validated model sits in the settings, for a part validated alone)."""
    messages = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        where = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "(top level)"
        if item["type"] == "extra_forbidden":
            messages.append(f"{where}: unknown key")
        elif item["type"] == "missing":
            messages.append(f"{where}: required but not given")
        else:
            hidden = "api_keys" in loc or isinstance(item.get("input"), (dict, list))
            shown = "" if hidden else f" (got {item.get('input')!r})"
            messages.append(f"{where}: {item['msg']}{shown}")
    return "invalid configuration: " + "; ".join(messages)


def load_settings(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    environ: bool = True,
    default_engine: Any = None,
) -> ServerSettings:
    """Validate file < environment < ``overrides`` (the CLI flags) into one ``ServerSettings``.

    ``default_engine`` (a callable returning an engine config dict) is consulted only when no source names
    a model (no ``engine.base``, no ``engine.experts``): that is how a bare ``proxy-serve`` serves the built-in
    demo, and other engine settings (``--max-num-seqs 4``) apply on top of it rather than replace it.
    """
    data: dict[str, Any] = read_config_file(config_file) if config_file else {}
    if environ:
        if os.environ.get(VLLM_RUNTIME_LORA_ENV, "").strip().lower() in ("1", "true", "yes"):
            data = deep_merge(data, {"allow_runtime_lora_updating": True})
        if os.environ.get(VLLM_LORA_RESOLVER_ENV, "").strip():
            data = deep_merge(data, {"lora_resolver_dir": os.environ[VLLM_LORA_RESOLVER_ENV].strip()})
        data = deep_merge(data, read_environment())
    data = deep_merge(data, overrides or {})
    engine = data.get("engine")
    names_a_model = engine is not None and (not isinstance(engine, dict) or "base" in engine or "experts" in engine)
    if default_engine is not None and not names_a_model:
        data["engine"] = deep_merge(default_engine(), engine or {})
    try:
        return ServerSettings(**data)
    except ValidationError as error:
        raise ConfigError(describe_error(error)) from None
