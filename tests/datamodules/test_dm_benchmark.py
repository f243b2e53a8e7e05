"""benchmarks/dataloading.py runs end to end in its smoke mode (1 batch per worker count)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_dataloading_benchmark_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its `import _bootstrap`, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_dataloading", BENCHMARKS / "dataloading.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--workers", "0", "1", "--batches", "1", "--warmup", "0", "--num-images", "4",
                         "--size-range", "64", "96", "--crop", "64", "--batch-size", "2", "--need", "1",
                         "--out", str(tmp_path)])
    assert [r["workers"] for r in result["rows"]] == [0, 1]
    assert all(r["images"] == 2 and r["images_per_s"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "dataloading.json").read_text())["rows"][1]["workers"] == 1
    out = capsys.readouterr().out
    assert "ADE20K training pipeline: synthetic (4 images" in out and "images/s" in out and "keeps up" in out
