#!/usr/bin/env bash
# The GPU check, one prepared script (8 minutes at most): proxy-tuned decoding vs the base alone on random
# 7B / 1.1B-shaped models (bf16, 32k vocabulary, built on the GPU, nothing on disk), 1 and 16 streams.
#   bash bench/gpu.sh                 # results in $OUT (when set) or bench/results: gpu.json, gpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
# Full shapes first (about 3 minutes on one H100); if they do not fit or fail, the smaller shapes.
if ! timeout 330 "$PYTHON" -m bench.gpu_bench --out "$OUT_DIR"; then
  echo "full-shape run failed or timed out: running --quick" >&2
  timeout 140 "$PYTHON" -m bench.gpu_bench --quick --out "$OUT_DIR"
fi
