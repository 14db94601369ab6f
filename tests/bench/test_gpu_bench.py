"""The GPU benchmark's code path, on the CPU with tiny shapes (no GPU here): every section runs and reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench import fusions, gpu_bench

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_quick_path(tmp_path):
    assert gpu_bench.main(["--cpu", "--quick", "--steps", "3", "--repeats", "1", "--prompt-tokens", "16",
                           "--ttft-tokens", "40", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_cpu_path.json").read_text())
    sections = report["sections"]
    assert report["errors"] == {}
    assert sections["bandwidth"]["floor_ms"] > 0
    assert set(sections["paper loop"]) == {"1", "16"}
    for label in ("engine, graphs", "engine, eager"):
        rows = sections[label]["rates"]
        assert set(rows) == {"1", "16"}
        for row in rows.values():
            assert set(row["ms_per_step"]) == {"proxy", "base", "expert"}
            assert all(value > 0 for value in row["ms_per_step"].values())
            assert row["proxy / (base + 2 x expert)"] > 0
        assert all(r["executor"] == "static" for r in sections[label]["runners"].values())
    assert sections["ttft"]["prompt_tokens"] == 40 and sections["ttft"]["ms"] > 0
    host = sections["host profile"]
    assert host["rows"] == 16 and host["profiled_ms_per_step"] > 0 and len(host["top"]) == 20
    assert any("static_decode.py" in f["function"] and f["calls_per_step"] == 3 for f in host["top"])  # 3 models
    assert sum(f["own_ms_per_step"] for f in host["top"]) <= host["profiled_ms_per_step"]
    # On the CPU both engines run the same step eagerly: identical tokens, greedy and seeded.
    for name in ("identity, real shapes", "identity fp32", "seeded sampling fp32"):
        assert sections[name]["identical"] == sections[name]["sequences"] > 0, name
    lora = sections["lora"]
    assert set(lora["rates"]) == {"1", "16"} and lora["weights_gb"]["unmerged"] < lora["weights_gb"]["merged"]
    assert all(row["ms_per_step"]["unmerged"] > 0 for row in lora["rates"].values())
    for by_rows in sections["fusions"]["timings"].values():
        assert set(by_rows) == {"1", "16"} and all(set(table) == set(fusions.VARIANTS) for table in by_rows.values())
    assert {profile["clock"] for profile in sections["fusions"]["profiles"].values()} == {"host"}
    table = (tmp_path / "gpu_cpu_path.md").read_text()
    assert "| engine, graphs | 16 |" in table and "| paper loop | 1 |" in table
    assert "LoRA expert, unmerged (weights" in table
    assert "| rotary on q, k apart | 16 |" in table and "host profile, graphs engine, 16 rows" in table


def test_tokenizer_has_the_shared_vocabulary():
    tok = gpu_bench.tokenizer()
    assert len(tok) == gpu_bench.VOCAB and tok.eos_token_id == 2
    assert tok.decode([5, 31999]) == "t5 t31999"


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
