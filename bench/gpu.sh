#!/usr/bin/env bash
# The GPU check, one prepared script (6 minutes at most): the gpu tests, then bench/gpu_bench.py (the engine with
# CUDA graphs and with --enforce-eager against the paper's loop and the bandwidth floor, TTFT, graph/eager token
# identity, LoRA unmerged vs merged, fusions one at a time, attention backends) on random 7B / 1.1B-shaped models
# (bf16, 32k vocabulary, nothing on disk).
#   bash bench/gpu.sh            # writes gpu.json, gpu.md, gpu.log, gpu-tests.xml to $OUT (when set) or bench/results
# Each part is time-boxed (SIGINT first, so Python prints where it was); a part that fails or times out does not
# stop the next; the report is rewritten after each bench section, and a summary table closes the log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
started=$(date +%s)
# The GPU image lacks pydantic & co.: wheels from ../shared/tools/gpu-wheels.sh, carried as .whl/, go to /tmp/site.
if [ -d .whl ] && ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
  timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # The carried transformers (the lock's) may want a newer huggingface-hub than the image has, and then fails at
  # import: keep the image's own transformers and tokenizers instead (the suite passes with 5.17 too).
  if ! "$PYTHON" -c "import transformers" >/dev/null 2>&1; then
    echo "the carried transformers does not import here; using the image's"
    rm -rf /tmp/site/transformers /tmp/site/transformers-* /tmp/site/tokenizers /tmp/site/tokenizers-*
  fi
fi
stamp() { echo "[gpu.sh +$(( $(date +%s) - started ))s] $*"; }

stamp "environment"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
timeout 15 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
timeout 60 "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())" || true

stamp "gpu tests (tests/gpu, 95 s at most)"
timeout -s INT -k 10 95 "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs tests/gpu \
  --junitxml="$OUT_DIR/gpu-tests.xml"
tests_rc=$?
stamp "gpu tests exit $tests_rc"

stamp "bench (230 s at most)"
timeout -s INT -k 10 230 "$PYTHON" -m bench.gpu_bench --verbose --out "$OUT_DIR"
bench_rc=$?
stamp "bench exit $bench_rc"

stamp "summary"
timeout 30 "$PYTHON" - "$OUT_DIR" "$tests_rc" "$bench_rc" <<'PY' || true
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    suite = ET.parse(out / "gpu-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    print(f"gpu tests: {suite.get('tests')} run, {suite.get('failures')} failed, {suite.get('errors')} errors, "
          f"{suite.get('skipped')} skipped (exit {tests_rc})")
except Exception as error:  # noqa: BLE001
    print(f"gpu tests: no report ({error}); exit {tests_rc}")
try:
    data = json.loads((out / "gpu.json").read_text())
except Exception as error:  # noqa: BLE001
    print(f"bench: no report ({error}); exit {bench_rc}")
    sys.exit(0)
s = data["sections"]
floor = (s.get("bandwidth") or {}).get("floor_ms")
paper = s.get("paper loop") or {}
print(f"bench exit {bench_rc}; {data.get('device')}; copy {((s.get('bandwidth') or {}).get('copy_tb_s') or 0):.2f} "
      f"TB/s; floor {floor or 0:.2f} ms/step")
print(f"{'run':16} {'streams':>7} {'proxy ms':>9} {'base ms':>8} {'expert ms':>9} {'p/(b+2e)':>8} {'proxy tok/s':>11} "
      f"{'base tok/s':>10} {'vs paper':>8} {'/ floor':>7}")
for label in ("engine, graphs", "engine, eager"):
    for level, row in ((s.get(label) or {}).get("rates") or {}).items():
        ms, rate = row["ms_per_step"], row["tokens_per_s"]
        peer = (paper.get(level) or {}).get("proxy_ms")
        print(f"{label:16} {level:>7} {ms['proxy']:9.2f} {ms['base']:8.2f} {ms['expert']:9.2f} "
              f"{row['proxy / (base + 2 x expert)']:8.2f} {rate['proxy']:11.0f} {rate['base']:10.0f} "
              f"{(peer / ms['proxy']) if peer else 0:8.2f} {(ms['proxy'] / floor) if floor else 0:7.2f}")
for level, row in paper.items():
    print(f"{'paper loop':16} {level:>7} {row['proxy_ms']:9.2f} {row['base_ms']:8.2f} {'-':>9} {'-':>8} "
          f"{row['proxy_tok_s']:11.0f} {row['base_tok_s']:10.0f} {1:8.2f} {(row['proxy_ms'] / floor) if floor else 0:7.2f}")
if s.get("ttft"):
    print(f"TTFT {s['ttft']['prompt_tokens']}-token prompt: {s['ttft']['ms']:.1f} ms")
for name in ("identity, real shapes", "identity fp32", "seeded sampling fp32"):
    if s.get(name):
        print(f"{name}: {s[name]['identical']}/{s[name]['sequences']} identical; {s[name]['divergences'][:4]}")
if s.get("host profile"):
    host = s["host profile"]
    print(f"host profile ({host['rows']} rows, graphs): {host['profiled_ms_per_step']} ms per step under cProfile")
    for f in host["top"][:10]:
        print(f"  {f['own_ms_per_step']:8.3f} ms own {f['cum_ms_per_step']:8.3f} ms cum {f['calls_per_step']:6} calls  "
              f"{f['function']}")
if s.get("fusions"):
    from bench.fusions import markdown as fusion_lines
    print("\n".join(fusion_lines(s["fusions"])))
for label in ("engine, graphs: start", "engine, eager: start"):
    if s.get(label):
        print(label, json.dumps(s[label]))
if data.get("errors"):
    print("bench errors:", json.dumps(data["errors"])[:1500])
PY
stamp "done"
