"""``proxy-serve``: help, configuration errors (one line naming the key, non-zero exit), precedence, and a real
run serving the tiny family until SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import httpx
import pytest

from server.cli import build_parser, overrides_from_args, resolve_settings
from server.settings import ConfigError, load_settings
from tests.server.fake_engine import FakeEngine
from tests.server.live import LiveServer, cli_server, wait_until

SECRET = "sk-never-logged-4242"


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_documents_every_flag():
    result = _run("--help")
    assert result.returncode == 0
    for flag in ("--config", "--base", "--expert", "--anti-expert", "--alpha", "--served-model-name", "--host",
                 "--port", "--base-device", "--base-dtype", "--expert-device", "--anti-expert-dtype", "--api-key",
                 "--allowed-origins", "--max-num-seqs", "--max-waiting", "--scheduling-policy", "--request-timeout",
                 "--log-prompts", "--max-body-bytes", ":base", ":expert", "PROXY_SERVE_"):
        assert flag in result.stdout, flag


def test_unknown_config_key_exits_with_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("engine:\n  base: {path: /m}\n  limits: {max_num_seqz: 3}\n")
    result = _run("--config", str(config))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "engine.limits.max_num_seqz" in result.stderr and "unknown key" in result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--base", "/m", "--port", "eighty"], "port"),
        (["--base", "/m", "--base-dtype", "float8"], "engine.base.dtype"),
        (["--base", "/m", "--expert", "/e"], "engine.experts.0.anti_expert"),
        (["--base", "/m", "--base-device", "tpu"], "engine.base.device"),
        (["--base", "/m", "--scheduling-policy", "lifo"], "engine.limits.scheduling_policy"),
    ],
)
def test_bad_flag_values_name_the_key(args, named):
    result = _run(*args)
    assert result.returncode != 0 and named in result.stderr and "Traceback" not in result.stderr


def test_precedence_flags_over_environment_over_file(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent("""
        port: 7000
        served_model_name: from-file
        engine:
          base: {path: /base}
          experts:
            - expert: {path: /e1}
              anti_expert: {path: /a1}
              alpha: 0.5
          limits: {max_num_seqs: 4}
    """))
    monkeypatch.setenv("PROXY_SERVE_PORT", "7001")
    monkeypatch.setenv("PROXY_SERVE_ENGINE__LIMITS__MAX_NUM_SEQS", "6")
    args = build_parser().parse_args(["--alpha", "2", "--expert-device", "cuda:0", "--port", "7002",
                                      "--api-key", "k1", "--api-key", "k2", "--allowed-origins", "http://a,http://b"])
    settings = load_settings(config, overrides_from_args(args))
    assert settings.port == 7002 and settings.served_model_name == "from-file"
    assert settings.engine.limits.max_num_seqs == 6
    pair = settings.engine.experts[0]
    assert (pair.alpha, pair.expert.path, pair.expert.device, pair.anti_expert.path) == (2.0, "/e1", "cuda:0", "/a1")
    assert settings.api_key_values() == ["k1", "k2"] and "k1" not in repr(settings)
    assert settings.allowed_origins == ["http://a", "http://b"]
    monkeypatch.setenv("PROXY_SERVE_MAX_BODY_BYTES", "tiny")
    with pytest.raises(ConfigError, match="max_body_bytes"):
        load_settings(config)


def test_no_engine_anywhere_uses_the_default_model():
    settings = load_settings(overrides={}, environ=False, default_engine=lambda: {"base": {"path": "/demo"}})
    assert settings.engine.base.path == "/demo"


def test_serves_a_triple_from_flags_until_sigterm(tiny_family, tmp_path):
    log = tmp_path / "server.log"
    args = ["--base", str(tiny_family.base), "--expert", str(tiny_family.expert), "--anti-expert",
            str(tiny_family.anti_expert), "--api-key", SECRET, "--served-model-name", "tiny"]
    with cli_server(args, log) as (url, process):
        headers = {"Authorization": f"Bearer {SECRET}"}
        models = httpx.get(f"{url}/v1/models", headers=headers).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "tiny:base", "tiny:expert"]
        response = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                              json={"model": "tiny", "prompt": "private prompt text", "max_tokens": 3})
        assert response.status_code == 200
    text = log.read_text()
    assert process.returncode == 0, text  # drained and exited cleanly, not killed by the re-raised signal
    assert f"listening on {url}" in text
    assert str(tiny_family.base) in text and "on cpu" in text  # what was loaded where
    assert "model=tiny status=200" in text  # the request's line
    assert "private prompt text" not in text and SECRET not in text
    assert "draining" in text


TRIPLE = ["--base", "/m/base", "--expert", "/m/expert", "--anti-expert", "/m/anti", "--expert-prompt-format", "chat"]


def test_vllms_model_flags_set_every_model_but_where_a_models_own_flag_is_given(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    settings, _ = resolve_settings([*TRIPLE, "--dtype", "bfloat16", "--expert-dtype", "float32", "--trust-remote-code",
                                    "--chat-template", str(template), "--device", "cuda:1", "--base-device", "cuda:0",
                                    "--enable-auto-tool-choice", "--tool-call-parser", "mistral", "--seed", "7",
                                    "--max-num-batched-tokens", "64"])
    engine = settings.engine
    base, expert, anti = engine.base, engine.experts[0].expert, engine.experts[0].anti_expert
    assert (base.dtype, expert.dtype, anti.dtype) == ("bfloat16", "float32", "bfloat16")
    assert (base.device, expert.device, anti.device) == ("cuda:0", "cuda:1", "cuda:1")
    assert base.trust_remote_code and expert.trust_remote_code and anti.trust_remote_code
    # the chat template goes to the model that reads chat (the expert), from a file or given inline
    assert (base.chat_template, expert.chat_template, anti.chat_template) == (None, template.read_text(), None)
    inline, _ = resolve_settings([*TRIPLE, "--chat-template", "{{ messages[0]['content'] }}"])
    assert inline.engine.experts[0].expert.chat_template == "{{ messages[0]['content'] }}"
    assert (engine.tool_call_format, engine.seed, engine.limits.max_num_batched_tokens) == ("mistral", 7, 64)
    with pytest.raises(ConfigError, match="--chat-template: no model reads chat"):
        resolve_settings([*TRIPLE[:6], "--chat-template", str(template)])
    with pytest.raises(ConfigError, match=r"--dtype float8: invalid configuration: engine\.base\.dtype: Input"):
        resolve_settings([*TRIPLE, "--dtype", "float8"])
    with pytest.raises(ConfigError, match="tool_call_format"):
        resolve_settings([*TRIPLE, "--tool-call-parser", "kimi_k2"])
    # vLLM's Llama 4 names for formats read here under other names
    assert resolve_settings([*TRIPLE, "--tool-call-parser", "llama4_pythonic"])[0].engine.tool_call_format == "pythonic"
    assert resolve_settings([*TRIPLE, "--tool-call-parser", "llama4_json"])[0].engine.tool_call_format == "llama3_json"


def test_repeated_expert_flags_name_several_pairs_over_one_anti_expert():
    """``--expert A --expert B --anti-expert C``: two pairs over one anti-expert (loaded once: layout.py); a pair
    flag given once is every pair's, as are the per-model flags; counts that do not line up are refused."""
    settings, _ = resolve_settings(["--base", "/b", "--expert", "/chat", "--expert", "/code", "--anti-expert", "/small",
                                    "--alpha", "1.0", "--alpha", "0.5", "--anti-expert-dtype", "bfloat16",
                                    "--expert-prompt-format", "chat"])
    pairs = settings.engine.experts
    assert [(p.expert.path, p.anti_expert.path, p.alpha) for p in pairs] == [("/chat", "/small", 1.0),
                                                                           ("/code", "/small", 0.5)]
    assert {p.anti_expert.dtype for p in pairs} == {"bfloat16"} and {p.expert.prompt_format for p in pairs} == {"chat"}
    assert pairs[0].anti_expert == pairs[1].anti_expert  # one model for both roles
    one, _ = resolve_settings(["--base", "/b", "--expert", "/e", "--anti-expert", "/a", "--alpha", "2"])
    assert [(p.expert.path, p.alpha) for p in one.engine.experts] == [("/e", 2.0)]
    with pytest.raises(ConfigError, match="--anti-expert 2 times for 3 expert pairs"):
        resolve_settings(["--base", "/b", "--expert", "/1", "--expert", "/2", "--expert", "/3", "--anti-expert", "/a",
                          "--anti-expert", "/a2"])


def _self_signed(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


def test_https_with_the_ssl_flags_and_a_root_path_behind_a_proxy(tmp_path):
    key, cert = _self_signed(tmp_path)
    settings, _ = resolve_settings([*TRIPLE, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
                                    "--root-path", "/proxy"])
    server = LiveServer(FakeEngine(), settings)
    server.thread.start()
    url = server.url.replace("http://", "https://")
    try:
        with httpx.Client(base_url=url, verify=str(cert), timeout=10) as client:
            assert wait_until(lambda: _ok(client, "/health"), timeout=30)
            assert client.get("/v1/models").json()["data"][0]["id"] == "proxy-tuned"
            assert "/proxy/openapi.json" in client.get("/docs").text  # the docs page finds its schema behind it
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/health", timeout=5)  # plain HTTP is not served
    finally:
        server.stop()
    with pytest.raises(ConfigError, match="ssl_keyfile and ssl_certfile go together"):
        resolve_settings([*TRIPLE, "--ssl-keyfile", str(key)])
    with pytest.raises(ConfigError, match="ssl_certfile"):
        resolve_settings([*TRIPLE, "--ssl-keyfile", str(key), "--ssl-certfile", str(tmp_path / "missing.pem")])


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def test_gpu_memory_utilization_flag_is_vllms():
    settings, _ = resolve_settings(["--gpu-memory-utilization", "0.85"])
    assert settings.engine.runtime.gpu_memory_utilization == 0.85
    assert resolve_settings([])[0].engine.runtime.gpu_memory_utilization is None
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="gpu_memory_utilization"):
            resolve_settings(["--gpu-memory-utilization", bad])


def test_kv_cache_memory_flag_takes_a_size_or_vllms_bytes(monkeypatch):
    assert resolve_settings(["--kv-cache-memory", "4GiB"])[0].engine.runtime.kv_cache_memory == 4 * 1024**3
    assert resolve_settings(["--kv-cache-memory-bytes", "1000000"])[0].engine.runtime.kv_cache_memory == 1_000_000
    assert resolve_settings([])[0].engine.runtime.kv_cache_memory is None
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        resolve_settings(["--kv-cache-memory", "plenty"])
    monkeypatch.setenv("PROXY_SERVE_KV_CACHE_MEMORY", "512MiB")
    assert resolve_settings([])[0].engine.runtime.kv_cache_memory == 512 * 1024**2


def test_a_vllm_command_line_runs_as_it_is():
    settings, _ = resolve_settings(["--model", "/m/base", "--tensor-parallel-size", "1", "-pp", "1",
                                    "--enable-chunked-prefill", "--disable-log-stats", "--enable-prefix-caching",
                                    "--block-size", "32", "--disable-log-requests", "--gpu-memory-utilization", "0.9"])
    assert settings.engine.base.path == "/m/base" and not settings.engine.experts
    assert settings.engine.prefix_cache.enabled and settings.engine.prefix_cache.block_size == 32
    assert not settings.log_requests and settings.engine.runtime.gpu_memory_utilization == 0.9
    off, _ = resolve_settings(["--no-enable-prefix-caching"])
    assert not off.engine.prefix_cache.enabled


@pytest.mark.parametrize("argv", [["-tp", "2"], ["--pipeline-parallel-size", "4"]])
def test_model_parallelism_is_refused_with_what_to_do_instead(argv):
    with pytest.raises(ConfigError, match=r"parallel-size \d: tensor and pipeline parallelism are not done here.*"
                                          r"--base-device cuda:0,cuda:1"):
        resolve_settings(argv)


def test_the_base_may_come_first_as_vllm_serve_takes_it():
    settings, _ = resolve_settings(["/m/base", "--expert", "/m/e", "--anti-expert", "/m/a"])
    assert settings.engine.base.path == "/m/base" and settings.engine.experts[0].expert.path == "/m/e"
    with pytest.raises(ConfigError, match="the base is given twice"):
        resolve_settings(["/m/base", "--base", "/m/other"])


def test_the_rest_of_a_vllm_serve_command_line_is_honoured_accepted_or_refused_with_a_reason():
    """vLLM's serving flags: the ones done here set their settings; the ones that ask for nothing this server does
    not do anyway are accepted; the ones that would change what is served are refused in one line saying why."""
    settings, _ = resolve_settings([
        "--model", "/m/base", "--uvicorn-log-level", "warning", "--max-log-len", "100", "--disable-fastapi-docs",
        "--return-tokens-as-token-ids", "--disable-frontend-multiprocessing", "--enable-request-id-headers",
        "--disable-uvicorn-access-log", "--swap-space", "4", "--enable-lora", "--max-lora-rank", "64",
        "--max-loras", "2", "--disable-custom-all-reduce", "--distributed-executor-backend", "mp",
        "--hf-token", "hf_x", "--kv-cache-dtype", "auto", "--load-format", "safetensors", "--tokenizer", "/m/tok",
        "--revision", "v1.0",
        "--response-role", "assistant", "--chat-template-content-format", "string",
    ])
    assert settings.uvicorn_log_level == "warning" and settings.max_log_len == 100
    assert not settings.fastapi_docs and settings.return_tokens_as_token_ids
    assert not settings.engine.runtime.engine_process
    assert settings.engine.base.tokenizer == "/m/tok" and settings.engine.base.revision == "v1.0"
    defaults, _ = resolve_settings(["--model", "/m/base"])
    assert defaults.uvicorn_log_level is None and defaults.max_log_len is None and defaults.fastapi_docs
    assert not defaults.return_tokens_as_token_ids and defaults.engine.runtime.engine_process
    for argv, reason in [
        (["--quantization", "awq"], "GGUF.*quantization: 8bit or 4bit"),
        (["--kv-cache-dtype", "fp8"], "each model's dtype"),
        (["--load-format", "bitsandbytes"], "transformers"),
        (["--download-dir", "/models"], "HF_HUB_CACHE"),
        (["--speculative-config", "{}"], "speculative"),
        (["--response-role", "bot"], "assistant"),
        (["--chat-template-content-format", "openai"], "one string"),
    ]:
        with pytest.raises(ConfigError, match=reason) as refused:
            resolve_settings(["--model", "/m/base", *argv])
        assert str(refused.value).startswith(f"{argv[0]} {argv[1]}: ")
    result = _run("--model", "/m/base", "--quantization", "gptq")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--quantization gptq" in result.stderr


def test_uvicorn_log_level_follows_log_level_unless_set():
    from server.http_protocol import uvicorn_config

    engine = {"base": {"path": "/m/base"}}
    quiet = load_settings(overrides={"engine": engine, "log_level": "error"}, environ=False)
    assert uvicorn_config(None, quiet).log_level == "error"
    own = load_settings(overrides={"engine": engine, "log_level": "error", "uvicorn_log_level": "debug"},
                        environ=False)
    assert uvicorn_config(None, own).log_level == "debug"
