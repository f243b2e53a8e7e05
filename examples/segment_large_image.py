"""Sliding-window segmentation of one large image with a trained semantic-segmentation checkpoint.

To run (from the repo root):
    python examples/segment_large_image.py --ckpt runs/demo_shapes/lightning_logs/version_0/checkpoints/last.ckpt \
        --image my_image.jpg --out runs/large_image
    python examples/segment_large_image.py --demo    # untrained tiny model on a synthetic 420 x 300 image

Windows of --window pixels every --stride pixels are blended ("mean" or "gaussian"); the result
has the image's full size. Writes <out>/<stem>_labels.png (palette PNG of class indices) and
<out>/<stem>_overlay.png.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image

from mamba_dense.tasks import SemanticSegmentationTask
from mamba_dense.tasks.visualize import IMAGENET_MEAN, IMAGENET_STD, overlay, save_label_png, save_rgb_png


def main(argv: list[str] | None = None) -> np.ndarray:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="checkpoint of a SemanticSegmentationTask")
    parser.add_argument("--image", help="RGB image file")
    parser.add_argument("--demo", action="store_true", help="random tiny model and a synthetic image")
    parser.add_argument("--out", default="runs/large_image")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=170)
    parser.add_argument("--blend", choices=["mean", "gaussian"], default="gaussian")
    args = parser.parse_args(argv)
    if not args.demo and not (args.ckpt and args.image):
        parser.error("give --ckpt and --image, or --demo")

    runtime = dict(inference_mode="slide", window_size=args.window, window_stride=args.stride, window_blend=args.blend)
    if args.demo:
        task = SemanticSegmentationTask(
            num_classes=5, encoder="vmamba_tiny", head="fpn", aux_head=False, encoder_kwargs={"dims": 16, "depths": [1, 1, 1, 1]},
            head_kwargs={"pyramid_channels": 32, "segmentation_channels": 32}, **runtime,
        )
        rgb = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
        stem = "demo"
    else:
        # encoder_weights=None: the checkpoint holds the trained encoder; no pretraining file needed
        task = SemanticSegmentationTask.load_from_checkpoint(args.ckpt, map_location="cpu", encoder_weights=None, **runtime)
        rgb = np.array(Image.open(args.image).convert("RGB"))
        stem = os.path.splitext(os.path.basename(args.image))[0]
    task.eval()
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        labels = task.inference(x[None]).argmax(1)[0].numpy()
    os.makedirs(args.out, exist_ok=True)
    save_label_png(labels, os.path.join(args.out, f"{stem}_labels.png"))
    save_rgb_png(overlay(rgb, labels), os.path.join(args.out, f"{stem}_overlay.png"))
    print(f"{rgb.shape[1]}x{rgb.shape[0]} image -> {args.out}/{stem}_labels.png, classes {np.unique(labels).tolist()}")
    return labels


if __name__ == "__main__":
    main()
