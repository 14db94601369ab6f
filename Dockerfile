# syntax=docker/dockerfile:1
# proxy-serve: an OpenAI-compatible server for proxy-tuned models, on NVIDIA GPUs (or the CPU for the demo).
#
#   docker build -t proxy-serve .
#   docker run -p 8000:8000 proxy-serve                                   # the built-in demo, CPU, no volume
#   docker run --gpus all -p 8000:8000 -v /models:/models proxy-serve --config /models/x.yaml
#   docker run --gpus all proxy-serve --config /models/x.yaml --check      # plan only, no weights loaded
#
# The CUDA "base" flavour is enough: the torch wheel brings its own CUDA runtime, cuBLAS and cuDNN (as pip
# packages), so the "runtime" flavour would only add a second copy of them. The host needs an NVIDIA driver
# recent enough for the wheel's CUDA (12.8: driver >= 570) and the NVIDIA Container Toolkit.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

# Linux x86_64 torch wheels on PyPI are CUDA builds; set TORCH_INDEX_URL to a cuXYZ wheel index for another
# CUDA version. EXTRA_PIP adds optional packages, e.g. --build-arg EXTRA_PIP=bitsandbytes for 8bit/4bit.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ARG EXTRA_PIP=""
ARG APP_UID=10001

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The heaviest layer first, so that code changes do not re-download torch. TORCH_SPEC carries the pin.
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# .dockerignore is an allow-list: the packages, pyproject, configs/ and the demo family under demo/ (so the
# image serves something with no volume at all).
WORKDIR /app
COPY . .
# EXTRA_PIP is the builder's to pin (e.g. bitsandbytes==X.Y.Z).
# hadolint ignore=DL3013
RUN pip install . ${EXTRA_PIP:+$EXTRA_PIP} \
    && rm -rf build ./*.egg-info \
    && python -c "import proxy_engine.placement, server.cli"

# Numeric non-root user (Kubernetes' runAsNonRoot can verify a number); uid 1000 is Ubuntu's own user.
RUN useradd --uid "$APP_UID" --user-group --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /models /config /home/app/.cache/huggingface \
    && chown -R app:app /models /config /home/app

# Models never download at run time: mount them at /models, or mount a Hugging Face cache (hub ids then resolve
# offline). PROXY_SERVE_* variables override the config file (PROXY_SERVE_API_KEYS='["sk-..."]', ...).
# (DL3064 mistakes TOKENIZERS_PARALLELISM for a token.)
# hadolint ignore=DL3064
ENV HF_HOME=/home/app/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PROXY_SERVE_HOST=0.0.0.0 \
    PROXY_SERVE_DEMO_DIR=/home/app/.cache/proxy-serve/demo
VOLUME ["/models", "/home/app/.cache/huggingface"]

USER ${APP_UID}:${APP_UID}
EXPOSE 8000

# /health answers 503 while the models load (minutes for a 70B base): the start period covers that.
# PROXY_SERVE_PORT, when set, moves the probe with the server.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PROXY_SERVE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["proxy-serve"]
CMD ["--config", "/app/configs/demo-cpu.yaml"]
