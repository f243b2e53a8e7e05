"""benchmarks/determinism.py runs end to end in its CPU smoke mode (two toy-size fits, compared bit for bit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "determinism.py"


def test_benchmark_cpu_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--accelerator", "cpu", "--tiny", "--steps", "3", "--out", str(tmp_path),
           "--extra", f"--data.init_args.root={tmp_path / 'shapes'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "determinism.json").read_text())
    assert result["identical"] and result["device"] == "cpu"
    (attempt,) = result["attempts"]  # deterministic=true ran: no fallback needed on the CPU
    assert attempt["deterministic"] == "true" and attempt["warned_ops"] == []
    assert [r["step"] for r in attempt["rows"]] == [0, 1, 2] and all(r["identical"] for r in attempt["rows"])
    assert "3/3 steps bit-identical; first difference at step none" in proc.stdout
