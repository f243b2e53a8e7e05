"""Data-loading throughput of the ADE20K training pipeline, per DataLoader worker count.

To run (from the repo root, CPU only; the GPU plays no part):
    python benchmarks/dataloading.py                          # synthetic ADE20K-layout data, temp dir
    python benchmarks/dataloading.py --root data/ade --workers 0 2 4 8 --batches 50
    python benchmarks/dataloading.py --root ../shared/realdata/ade20k_sceneparsing --split validation

Smoke mode (what the tests run):
    python benchmarks/dataloading.py --workers 0 1 --batches 1 --warmup 0 --num-images 4 \
        --size-range 64 96 --crop 64 --batch-size 2

Pipeline: ``ADE20KDataModule.train_dataloader()`` exactly as training uses it (JPEG/PNG decode,
label remap, mmseg resize with ratio 0.5-2.0, ``cat_max_ratio`` crop, flip, photometric
distortion, normalization, padding, collate). For each ``--workers`` count, ``--warmup`` batches
are loaded untimed (worker start-up included there), then ``--batches`` batches are timed.
Reports images/s, images/s per worker (workers = 0 counts as one: the main process) and ms per
batch. ``--need`` (images/s the GPU consumes, e.g. 16 per step at 4 steps/s = 64) marks the
worker counts that keep up. With ``--root`` the dataset is only read; without it a synthetic
dataset (``write_ade20k_like``, ADE20K-like 384-683 px images) is written to a temp dir and removed.

Prints a table and, with ``--out``, writes ``dataloading.json`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (mamba_dense importable without an install)
import torch

from mamba_dense.datamodules import ADE20KDataModule, write_ade20k_like


def measure(dm_kwargs: dict, workers: int, batches: int, warmup: int) -> dict:
    """Load ``warmup`` + ``batches`` batches with ``workers`` workers; time the last ``batches``."""
    dm = ADE20KDataModule(num_workers=workers, persistent_workers=True, **dm_kwargs)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def stream():  # epochs back to back (persistent workers carry over)
        while True:
            yield from loader

    batches_in = stream()
    for _ in range(warmup):
        next(batches_in)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        images += next(batches_in)["image"].shape[0]
    elapsed = time.perf_counter() - start
    batches_in.close()
    del batches_in, loader  # shut the workers down before the next configuration
    rate = images / max(elapsed, 1e-9)
    return {"workers": workers, "images": images, "seconds": elapsed, "images_per_s": rate,
            "images_per_s_per_worker": rate / max(workers, 1), "ms_per_batch": 1000 * elapsed / max(batches, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="ADE20K-layout dataset (default: synthetic data in a temp dir)")
    p.add_argument("--split", default="training", help="sub-folder of images/ and annotations/ to read")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--num-images", type=int, default=64, help="synthetic images to write")
    p.add_argument("--size-range", type=int, nargs=2, default=(384, 683), help="synthetic image sides (px)")
    p.add_argument("--need", type=float, default=None, help="images/s the training step consumes")
    p.add_argument("--out", default=None, help="folder for dataloading.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="dataloading-") as tmp:
        if args.root is None:
            root = write_ade20k_like(Path(tmp) / "ade", num_train=args.num_images, num_val=1,
                                     size_range=tuple(args.size_range), seed=0)
            dm_kwargs = {"root": str(root), "num_classes": 5, "reduce_zero_label": False}
        else:
            dm_kwargs = {"root": args.root}
        dm_kwargs.update(crop_size=args.crop, batch_size=args.batch_size, train_split=args.split,
                         scale=(4 * args.crop, args.crop), pin_memory=False)
        rows = [measure(dm_kwargs, w, args.batches, args.warmup) for w in args.workers]

    source = args.root or f"synthetic ({args.num_images} images, {args.size_range[0]}-{args.size_range[1]} px)"
    print(f"ADE20K training pipeline: {source}, crop {args.crop}, batch {args.batch_size}, "
          f"{args.batches} timed batches after {args.warmup} warm-up, {os.cpu_count()} CPU cores")
    print(f"{'workers':>7} | {'images/s':>9} | {'per worker':>10} | {'ms/batch':>9}" + (" | keeps up" if args.need else ""))
    for r in rows:
        line = (f"{r['workers']:>7} | {r['images_per_s']:>9.1f} | {r['images_per_s_per_worker']:>10.1f} | "
                f"{r['ms_per_batch']:>9.1f}")
        if args.need:
            line += f" | {'yes' if r['images_per_s'] >= args.need else 'no'}"
        print(line)
    result = {"source": source, "crop": args.crop, "batch_size": args.batch_size, "batches": args.batches,
              "warmup": args.warmup, "cpu_count": os.cpu_count(), "need": args.need, "rows": rows,
              "command": " ".join(["python", *sys.argv])}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dataloading.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
