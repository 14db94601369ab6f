"""The GPU benchmark's code path, on the CPU with tiny shapes (no GPU here): it runs and reports every row."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench import gpu_bench

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_quick_path(tmp_path):
    assert gpu_bench.main(["--cpu", "--quick", "--steps", "4", "--repeats", "1", "--prompt-tokens", "16",
                           "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_cpu_path.json").read_text())
    rows = report["placements"]["one device"]
    assert set(rows) == {"1", "16"}
    for row in rows.values():
        assert set(row["ms_per_step"]) == {"proxy", "base", "expert"}
        assert all(value > 0 for value in row["ms_per_step"].values())
        assert row["proxy / (base + 2 x expert), step time"] > 0
    assert rows["16"]["proxy tokens/s vs 1 stream"] > 0
    assert "| one device | 16 |" in (tmp_path / "gpu_cpu_path.md").read_text()


def test_tokenizer_has_the_shared_vocabulary():
    tok = gpu_bench.tokenizer()
    assert len(tok) == gpu_bench.VOCAB and tok.eos_token_id == 2
    assert tok.decode([5, 31999]) == "t5 t31999"


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
