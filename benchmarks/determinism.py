"""Bit-identical training: two `mamba-dense fit` runs with one seed and `--trainer.deterministic`,
their per-step losses compared bit for bit (on a GPU by default).

To run (from the repo root):
    python benchmarks/determinism.py --out results/                      # GPU, demo recipe, 50 steps
    python benchmarks/determinism.py --precision bf16-mixed --steps 200 --out results/
    python benchmarks/determinism.py --accelerator cpu --tiny --steps 4 --out /tmp/det   # CPU smoke check

What runs: ``--config`` (default the demo recipe ``configs/demo/shapes.yaml``: VMamba + UPerNet on the
synthetic shapes, written to ``data/shapes`` on first use) for ``--steps`` optimizer steps with
validation at each epoch end, ``--runs`` times (default 2), each in its own process
(``python benchmarks/determinism.py --child ...``), so the runs share nothing but the dataset on
disk. ``--tiny`` shrinks the recipe to toy size (CPU smoke). Every run records each step's batch
(sha256 of its images), loss (``float.hex``) and the validation metrics.

``--deterministic true`` (default) is Lightning's ``deterministic=True``:
``torch.use_deterministic_algorithms(True)``, cuDNN deterministic, ``CUBLAS_WORKSPACE_CONFIG``.
An op with no deterministic CUDA implementation then raises; the script names it and, unless
``--no-fallback``, runs again with ``--deterministic warn`` (the op runs, torch warns) to show how
far the runs drift. The ops torch warned about are listed per run.

Prints a table (step, loss of each run, bit-identical or |difference|) and a summary, and with
``--out`` writes ``determinism.json`` there (with the runs' records and the command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401  (mamba_dense importable without an install)
import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model.init_args.encoder_kwargs={dims: 16, depths: [1, 1, 1, 1]}",
    "--model.init_args.head_kwargs={channels: 16, norm: groupnorm}",
    "--data.init_args.crop_size=64", "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
    "--data.init_args.num_train=8", "--data.init_args.num_val=2",
]
_NONDETERMINISTIC = re.compile(r"(\w+) does not have a deterministic implementation")


class StepRecorder(pl.Callback):
    """Appends one JSON line per training step (step, batch sha256, loss as float.hex) and per
    validation (epoch, metrics as float.hex) to ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        h = hashlib.sha256()
        for x in images if isinstance(images, (list, tuple)) else [images]:
            h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
        self._write({"step": trainer.global_step - 1, "batch": h.hexdigest(), "loss": float(loss.detach()).hex()})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v).hex() for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
            self._write({"val_epoch": trainer.current_epoch, "metrics": metrics})


def child(args: list[str], record: str) -> int:
    """One fit, in this process; records go to ``record``, the ops torch warned about to ``record + '.ops'``."""
    from mamba_dense.cli import build_cli

    ops: set[str] = set()
    show = warnings.showwarning

    def note(message: Any, *rest: Any, **kw: Any) -> None:
        found = _NONDETERMINISTIC.search(str(message))
        if found:
            ops.add(found.group(1))
        else:
            show(message, *rest, **kw)

    warnings.showwarning = note
    warnings.filterwarnings("always", message=".*does not have a deterministic implementation.*")
    callbacks = f"[{{class_path: determinism.StepRecorder, init_args: {{path: '{record}'}}}}]"
    try:
        build_cli([*args, f"--trainer.callbacks={callbacks}"])
    except RuntimeError as err:
        found = _NONDETERMINISTIC.search(str(err))
        with open(record, "a", encoding="utf-8") as f:
            f.write(json.dumps({"error": str(err).splitlines()[0], "op": found.group(1) if found else None}) + "\n")
        return 1
    finally:
        Path(record + ".ops").write_text(json.dumps(sorted(ops)))
    return 0


def fit_args(a: argparse.Namespace, deterministic: str, root: Path) -> list[str]:
    return [
        "fit", "--config", str(a.config), f"--seed_everything={a.seed}",
        f"--trainer.accelerator={a.accelerator}", "--trainer.devices=1", f"--trainer.precision={a.precision}",
        f"--trainer.deterministic={deterministic}", f"--trainer.max_steps={a.steps}", "--trainer.max_epochs=-1",
        "--trainer.enable_checkpointing=false", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
        *(TINY if a.tiny else []), *a.extra,
    ]


def run_all(a: argparse.Namespace, deterministic: str, work: Path) -> list[dict[str, Any]]:
    runs = []
    for i in range(a.runs):
        record = work / f"{deterministic}_run{i}.jsonl"
        record.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(record), "--",
               *fit_args(a, deterministic, work / f"{deterministic}_run{i}")]
        path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, PYTHONPATH=path)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
        ops_file = Path(str(record) + ".ops")
        runs.append({
            "returncode": proc.returncode,
            "steps": {r["step"]: r for r in lines if "step" in r},
            "val": {r["val_epoch"]: r["metrics"] for r in lines if "val_epoch" in r},
            "error": next((r for r in lines if "error" in r), None),
            "warned_ops": json.loads(ops_file.read_text()) if ops_file.exists() else [],
            "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
        })
        if proc.returncode:
            break  # the same error would repeat
    return runs


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = sorted(set.intersection(*(set(r["steps"]) for r in runs)))
    rows, first, worst = [], None, 0.0
    for s in steps:
        losses = [r["steps"][s]["loss"] for r in runs]
        same_batch = len({r["steps"][s]["batch"] for r in runs}) == 1
        values = [float.fromhex(x) for x in losses]
        diff = max(values) - min(values)
        identical = len(set(losses)) == 1 and same_batch
        if not identical and first is None:
            first = s
        worst = max(worst, diff)
        rows.append({"step": s, "losses": values, "same_batch": same_batch, "identical": identical, "abs_diff": diff})
    val_equal = all(r["val"] == runs[0]["val"] for r in runs)
    return {"rows": rows, "identical": first is None and val_equal and bool(rows), "first_mismatch": first,
            "max_abs_diff": worst, "val_identical": val_equal, "val": runs[0]["val"]}


def report(title: str, runs: list[dict[str, Any]], result: dict[str, Any]) -> None:
    print(f"\n{title}")
    header = " | ".join(f"{'loss run ' + str(i + 1):>16}" for i in range(len(runs)))
    print(f"{'step':>5} | {header} | bit-identical")
    for r in result["rows"]:
        other = "" if r["same_batch"] else ", other batch"
        verdict = "yes" if r["identical"] else f"no (|diff| {r['abs_diff']:.3g}{other})"
        print(f"{r['step']:>5} | " + " | ".join(f"{v:>16.9g}" for v in r["losses"]) + f" | {verdict}")
    n = len(result["rows"])
    same = sum(r["identical"] for r in result["rows"])
    first = "none" if result["first_mismatch"] is None else result["first_mismatch"]
    print(f"{same}/{n} steps bit-identical; first difference at step {first}; max |diff| "
          f"{result['max_abs_diff']:.3g}; validation metrics identical: {result['val_identical']}")
    for i, r in enumerate(runs):
        if r["warned_ops"]:
            print(f"run {i + 1}: torch warned, no deterministic implementation: {', '.join(r['warned_ops'])}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        sys.exit(child(argv[3:], argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo" / "shapes.yaml"))
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--deterministic", default="true", choices=["true", "warn"])
    p.add_argument("--no-fallback", action="store_true", help="no second try with --deterministic warn")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="toy-size model and data (CPU smoke check)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `mamba-dense fit` flags (last)")
    p.add_argument("--out", default=None, help="folder for determinism.json")
    a = p.parse_args(argv)

    device = torch.cuda.get_device_name(0) if a.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {"command": " ".join(["python", "benchmarks/determinism.py", *argv]), "device": device,
                              "torch": torch.__version__, "precision": a.precision, "steps": a.steps, "attempts": []}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"determinism: {a.config} on {device}, precision {a.precision}, {a.steps} steps, {a.runs} runs, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="determinism-") as tmp:
        modes = [a.deterministic] + (["warn"] if a.deterministic == "true" and not a.no_fallback else [])
        for mode in modes:
            runs = run_all(a, mode, Path(tmp))
            failed = next((r for r in runs if r["returncode"]), None)
            warned = sorted({op for r in runs for op in r["warned_ops"]})
            attempt: dict[str, Any] = {"deterministic": mode, "warned_ops": warned}
            if failed is not None:
                err = failed["error"] or {"error": failed["stderr_tail"], "op": None}
                attempt.update(error=err["error"], op=err["op"])
                print(f"\n--trainer.deterministic {mode}: the run failed: {err['error']}")
                result["attempts"].append(attempt)
                if err["op"] is None:
                    break
                continue
            cmp = compare(runs)
            attempt.update(cmp, records=[{"steps": r["steps"], "val": r["val"]} for r in runs])
            result["attempts"].append(attempt)
            report(f"--trainer.deterministic {mode}", runs, cmp)
            break
    result["identical"] = bool(result["attempts"]) and bool(result["attempts"][-1].get("identical"))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "determinism.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
