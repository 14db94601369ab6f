set -e
for i in 1 2; do
  (cd /tmp/before && /work/main/.venv/bin/python -m bench.architectures --levels 1 16 --rounds 2 --out /tmp/q3/before$i 2>&1 | grep "^|")
  (cd /work/main && .venv/bin/python -m bench.architectures --levels 1 16 --rounds 2 --out /tmp/q3/after$i 2>&1 | grep "^|")
done
