# proxy-serve: an OpenAI-compatible server for proxy-tuned models, on NVIDIA GPUs (or the CPU for the demo).
#
#   docker build -t proxy-serve .
#   docker run -p 8000:8000 proxy-serve                                   # the built-in demo, CPU, no volume
#   docker run -p 8000:8000 proxy-serve --api-key sk-test                 # flags add to the default (the demo)
#   docker run --gpus all -p 8000:8000 -v /models:/models proxy-serve --config /models/x.yaml
#   docker run --gpus all proxy-serve --config /models/x.yaml --check      # plan only, no weights loaded
#
# The PyPI torch wheel pinned below (torch==2.13.0, Linux x86_64) is a CUDA 13.0 build: it depends on
# cuda-toolkit==13.0.3 and the nvidia-*-cu13 wheels. So the base is CUDA 13.0 and the host needs an NVIDIA driver
# for CUDA 13 (>= 580) and the NVIDIA Container Toolkit. The CUDA "base" flavour is enough: the wheel brings its
# own CUDA runtime, cuBLAS and cuDNN as pip packages, and the base sets NVIDIA_REQUIRE_CUDA=cuda>=13.0, which
# the Container Toolkit checks against the host's driver. Another CUDA: change both build arguments together,
# e.g. --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (driver >= 570).
# Any base with apt, python3 (>= 3.10) and useradd works: scripts/docker_base.sh builds a Debian stand-in.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# TORCH_SPEC carries the pin (the CUDA build it brings is named above); TORCH_INDEX_URL selects another wheel
# index (a cuXYZ one, or https://download.pytorch.org/whl/cpu for a CPU-only image of ~1 GB). EXTRA_PIP adds
# optional packages, e.g. --build-arg EXTRA_PIP=bitsandbytes==X.Y.Z for 8bit/4bit.
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
# Every dependency at its tested version (requirements.lock, pip constraints; torch is TORCH_SPEC's, above).
# EXTRA_PIP is the builder's to pin (e.g. bitsandbytes==X.Y.Z).
# hadolint ignore=DL3013
RUN pip install -c requirements.lock . ${EXTRA_PIP:+$EXTRA_PIP} \
    && rm -rf build ./*.egg-info \
    && python -c "import proxy_engine.placement, server.cli"

# Numeric non-root user (Kubernetes' runAsNonRoot can verify a number); uid 1000 is Ubuntu's own user.
RUN useradd --uid "$APP_UID" --user-group --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /models /config /home/app/.cache/huggingface \
    && chown -R app:app /models /config /home/app

# The installed package serves the trained demo family under /app/demo/models when no model is configured
# (PROXY_SERVE_DEMO_MODELS), so flags given after the image name add to that default instead of losing it.
# SIGTERM drains: running requests get PROXY_SERVE_SHUTDOWN_GRACE_S seconds to finish, then the rest end with a
# "shutdown" error and the server exits 0 (about 3 s later). `docker stop` sends SIGKILL after 10 s unless told
# otherwise, so the grace here fits in that; for a longer one raise both: docker run --stop-timeout 40
# -e PROXY_SERVE_SHUTDOWN_GRACE_S=30 (compose: stop_grace_period; Kubernetes: terminationGracePeriodSeconds).
# Models never download at run time: mount them at /models, or mount a Hugging Face cache (hub ids then resolve
# offline). PROXY_SERVE_* variables override the config file (PROXY_SERVE_API_KEYS='["sk-..."]', ...).
# (DL3064 mistakes TOKENIZERS_PARALLELISM for a token.)
# hadolint ignore=DL3064
ENV HF_HOME=/home/app/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PROXY_SERVE_HOST=0.0.0.0 \
    PROXY_SERVE_SHUTDOWN_GRACE_S=5 \
    PROXY_SERVE_DEMO_MODELS=/app/demo/models \
    PROXY_SERVE_DEMO_DIR=/home/app/.cache/proxy-serve/demo
VOLUME ["/models", "/home/app/.cache/huggingface"]

USER ${APP_UID}:${APP_UID}
EXPOSE 8000

# /health answers 503 while the models load (minutes for a 70B base): the start period covers that.
# PROXY_SERVE_PORT, when set, moves the probe with the server.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PROXY_SERVE_PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["proxy-serve"]
# No default arguments: a bare proxy-serve serves the demo (above), and whatever follows the image name is
# added to it (--api-key, --max-num-seqs, ...) or replaces it (--config FILE, --base/--expert/--anti-expert).
CMD []
