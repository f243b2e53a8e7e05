"""Train the shapes demo from Python, without the CLI: a variant of configs/demo/shapes.yaml (semantic FPN head,
10 epochs by default, no checkpoints).

To run (from the repo root):
    python examples/train_shapes.py                  # a few minutes on a 2-core CPU
    python examples/train_shapes.py --fast-dev-run   # one batch of each stage, seconds

It writes the synthetic dataset to data/shapes (once; data/shapes_tiny with --fast-dev-run), trains a small VMamba + semantic FPN,
prints the validation mIoU per epoch and the per-class table of the test set, and writes
label-map and overlay PNGs of the test images to <out>/predictions.
"""

from __future__ import annotations

import argparse
import os
import time

import lightning.pytorch as pl

from mamba_dense.datamodules.ade20k import ShapesDataModule
from mamba_dense.tasks import OverlayLogger, SemanticSegmentationTask


def main(argv: list[str] | None = None) -> SemanticSegmentationTask:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None,
                        help="dataset folder, written if absent (default data/shapes; data/shapes_tiny with --fast-dev-run)")
    parser.add_argument("--out", default="runs/example_shapes", help="logs, checkpoints and predictions")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--fast-dev-run", action="store_true", help="one batch per stage, tiny model")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    tiny = args.fast_dev_run
    args.root = args.root or ("data/shapes_tiny" if tiny else "data/shapes")  # a tiny dataset of its own
    data = ShapesDataModule(root=args.root, crop_size=64 if tiny else 128, batch_size=2 if tiny else 4,
                            val_batch_size=2 if tiny else 4, num_train=4 if tiny else 64, num_val=2 if tiny else 16)
    task = SemanticSegmentationTask(
        num_classes=5,
        encoder="vmamba_tiny",
        encoder_kwargs={"dims": 16 if tiny else 32, "depths": [1, 1, 1, 1] if tiny else [1, 1, 2, 1]},
        drop_path_rate=0.0,
        head="fpn",
        head_kwargs={"pyramid_channels": 32 if tiny else 64, "segmentation_channels": 32},
        aux_head=False,
        dice_weight=0.5,
        lr=3e-3,
        warmup_iters=16,
        predict_dir=os.path.join(args.out, "predictions"),
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, fast_dev_run=args.fast_dev_run, accelerator="auto", devices=1,
        precision="32-true", default_root_dir=args.out, log_every_n_steps=4, num_sanity_val_steps=0,
        callbacks=[OverlayLogger(num_images=4)],
    )
    start = time.time()
    trainer.fit(task, data)
    print(f"trained in {time.time() - start:.0f} s")
    trainer.test(task, data)  # prints the per-class IoU table
    trainer.predict(task, data)
    print(f"predictions in {task.predict_dir()}")
    return task


if __name__ == "__main__":
    main()
