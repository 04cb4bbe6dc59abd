"""The benchmark script runs end to end at its smallest sizes (no timing is asserted: speed is reported, not tested)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generation.py"


def test_benchmark_quick_prints_every_table(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    # The equivalence check ran before any timing and found peft's greedy tokens.
    assert "greedy tokens identical" in out
    assert out.index("greedy tokens identical") < out.index("### Prefill forward")
    for title in ("### Prefill forward", "### Greedy generation", "### Expert-count sweep", "### Peak memory"):
        assert title in out, f"missing table {title!r}"
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    for label in ("base model", "peft X-LoRA", "xlora-hub"):
        assert any(row.startswith(f"| {label}") for row in rows), f"no row for {label}"
    # Both quick generation lengths and both sweep sizes have rows.
    gen_rows = [row for row in rows if row.startswith("| xlora-hub") and "|" in row]
    assert len(gen_rows) >= 3  # prefill, 2 generation lengths, memory
    sweep = out.split("### Expert-count sweep")[1].split("###")[0]
    assert [
        line.split("|")[1].strip() for line in sweep.splitlines() if line.startswith("| ") and "experts" not in line
    ] == [
        "2",
        "4",
    ]
    assert "time/FLOP ratio" in out and "x peft tokens/s" in out


def test_benchmark_quantized_section_runs_on_a_bitsandbytes_base(tmp_path):
    import pytest

    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'xlora-hub[quant]')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--quantize", "bnb-nf4", "--sections", "quantized"]
        + ["--workdir", str(tmp_path), "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = proc.stdout.split("### Quantized base (bnb-nf4, recorded as 'bitsandbytes-nf4'")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "new tokens" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["bnb-nf4 base model", "xlora-hub on bnb-nf4"] * 2
    assert "### Prefill forward" not in proc.stdout  # only the asked section ran
