"""Long mixed-precision training runs: vmamba_tiny + UPerNet (512 channels) for 1,000 steps under
bf16 autocast and under fp16 autocast with a GradScaler, on the synthetic shapes dataset, with the
real Lightning Trainer and the guards the CLI installs (NonFiniteGuard stops at the first NaN/inf
loss). Reports, per precision: finite losses, first/last loss (averaged over 50 steps), the fp16
loss scale at the end and how many steps the scaler skipped.

To run (CUDA machine, repo root):
    python benchmarks/amp_long.py [--steps 1000] [--precisions bf16-mixed,16-mixed]
        [--crop 256] [--batch 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.scales: list[float] = []
        self.skipped = 0
        self._prev_scale = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            s = float(scaler.get_scale())
            if self._prev_scale is not None and s < self._prev_scale:
                self.skipped += 1  # the scaler lowers the scale exactly when it skips a step (inf/NaN grads)
            self._prev_scale = s
            self.scales.append(s)


def run(precision: str, steps: int, crop: int, batch: int, root: str, lr: float, accelerator: str = "gpu") -> dict:
    from mamba_dense.datamodules.ade20k import ShapesDataModule
    from mamba_dense.tasks import SemanticSegmentationTask
    from mamba_dense.tasks.guards import NonFiniteGuard

    pl.seed_everything(0, workers=True)
    task = SemanticSegmentationTask(
        num_classes=5, encoder="vmamba_tiny", head="upernet", head_kwargs=dict(channels=512),
        aux_head=True, lr=lr, warmup_iters=100, drop_path_rate=0.2,
    )
    dm = ShapesDataModule(root=root, crop_size=crop, batch_size=batch, num_workers=6 if accelerator == "gpu" else 0, num_train=512, num_val=16)
    rec = Recorder()
    guard = NonFiniteGuard()
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[rec, guard],
        default_root_dir=tempfile.mkdtemp(),
    )
    t0 = time.perf_counter()
    error = ""
    try:
        trainer.fit(task, datamodule=dm)
    except Exception as e:  # NonFiniteGuard raises here; report it
        error = f"{type(e).__name__}: {str(e)[:600]}"
    wall = time.perf_counter() - t0
    finite = all(math.isfinite(v) for v in rec.losses)
    params_finite = all(bool(torch.isfinite(p).all()) for p in task.parameters())
    res = dict(
        precision=precision, steps=len(rec.losses), crop=crop, batch=batch, lr=lr, wall_s=wall,
        all_losses_finite=finite, params_finite=params_finite, error=error,
        loss_first50=sum(rec.losses[:50]) / max(1, len(rec.losses[:50])),
        loss_last50=sum(rec.losses[-50:]) / max(1, len(rec.losses[-50:])),
        final_scale=rec.scales[-1] if rec.scales else None, scaler_skipped_steps=rec.skipped,
        losses=rec.losses,
    )
    print(f"{precision:10s} steps {res['steps']:5d}  finite {finite}  params finite {params_finite}  "
          f"loss {res['loss_first50']:.3f} -> {res['loss_last50']:.3f}  scale {res['final_scale']}  "
          f"skipped {rec.skipped}  {wall:.0f} s  {error}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--precisions", default="bf16-mixed,16-mixed")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--accelerator", default="gpu", help="cpu for a smoke check (e.g. --steps 3 --crop 64 --batch 2)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import triton

    info = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__, triton=triton.__version__,
                lightning=pl.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), cmd=" ".join(sys.argv))
    print(info, flush=True)
    root = tempfile.mkdtemp(prefix="shapes_")
    rows = []
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for p in args.precisions.split(","):
        rows.append(run(p, args.steps, args.crop, args.batch, root, args.lr, args.accelerator))
        (Path(args.out) / "amp_long.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
