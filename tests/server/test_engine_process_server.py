"""The server over the engine core in its own process: a streamed completion, /tokenize (vLLM's and TGI's),
/metrics, a 400, and a killed engine process failing /health."""

from __future__ import annotations

import json

import httpx

from proxy_engine.engine_process import EngineProcess
from server.metrics import PREFIX
from tests.server.live import MODEL, LiveServer, make_settings, wait_until


def test_the_server_over_an_engine_process(tiny_family):
    settings = make_settings(tiny_family)
    engine = EngineProcess(settings.engine)
    server = LiveServer(engine, settings).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["usage"]["completion_tokens"] == 5

            tokens = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello"}).json()["tokens"]
            assert http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"].strip()
            strs = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello", "return_token_strs": True}).json()
            assert strs["tokens"] == tokens and len(strs["token_strs"]) == len(tokens)  # pieces from the child's
            tgi = http.post("/tokenize", json={"inputs": "Hello"}).json()  # TGI's: ids and offsets from the child
            assert [t["id"] for t in tgi] == tokens and "".join(t["text"] for t in tgi) == "Hello"
            # The prompt's ids come back from the child with the admission (vLLM's return_token_ids).
            ids = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3,
                                                     "ignore_eos": True, "return_token_ids": True}).json()
            assert ids["choices"][0]["prompt_token_ids"] == tokens and len(ids["choices"][0]["token_ids"]) == 3
            too_long = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10**9})
            assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
            # n is checked before the request's stream is sized by it: a huge n once held the event loop, building
            # a set of 2**70 choices until the kernel killed the server
            for n in (2**70, 17, 0):
                for path, prompt in (("/v1/completions", {"prompt": "x"}),
                                     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
                    huge = http.post(path, json={"model": MODEL, **prompt, "n": n, "max_tokens": 2}, timeout=10)
                    assert huge.status_code == 400 and huge.json()["error"]["param"] == "n"

            def generated() -> float:  # the stats come back from the child with each step
                lines = http.get("/metrics").text.splitlines()
                return max(float(line.split()[-1]) for line in lines
                           if line.startswith(f"{PREFIX}_generation_tokens") and not line.startswith("#"))

            assert wait_until(lambda: generated() >= 5)
            steps = [line for line in http.get("/metrics").text.splitlines()
                     if line.startswith("vllm:iteration_tokens_total_count")]  # the step histogram crosses the pipe
            assert len(steps) == 1 and float(steps[0].split()[-1]) >= 5

            engine.process.kill()
            assert wait_until(lambda: http.get("/health").status_code == 503, timeout=30)
            assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503
    finally:
        server.stop()
