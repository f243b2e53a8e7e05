"""Images a person can look at: palettes, label-map PNGs, segmentation and instance overlays."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def palette(num_colors: int = 256) -> np.ndarray:
    """(num_colors, 3) uint8 colors, the PASCAL VOC bit-interleaving palette (0 is black)."""
    colors = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors[i] = (r, g, b)
    return colors


def to_uint8_image(image: torch.Tensor, mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD) -> np.ndarray:
    """(3, H, W) float image (normalized with mean/std, or in [0, 1] when they are None) -> (H, W, 3) uint8."""
    x = image.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _full_palette(colors: Sequence[Sequence[int]] | np.ndarray | None, n: int = 256) -> np.ndarray:
    """(max(n, 256, len(colors)), 3) uint8: `colors` (e.g. a datamodule's class palette) completed by `palette()`."""
    c = np.asarray(colors, dtype=np.uint8).reshape(-1, 3) if colors is not None and len(colors) else None
    full = palette(max(n, 256, 0 if c is None else len(c)))
    if c is not None:
        full[: len(c)] = c
    return full


def colorize(labels: np.ndarray, ignore_index: int = 255, colors: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8 colors (class k -> colors[k], any number of classes); ignore_index
    is black."""
    labels = np.asarray(labels)
    top = int(labels[labels != ignore_index].max(initial=0)) + 1  # a large ignore_index needs no colour
    pal = _full_palette(colors, top)
    out = pal[np.clip(labels, 0, len(pal) - 1).astype(np.int64)]  # (ignored labels are blacked out below)
    out[labels == ignore_index] = 0
    return out


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.5,
    ignore_index: int = 255,
    colors: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Blend label colors onto an (H, W, 3) uint8 image; ignored pixels stay as the image."""
    color = colorize(labels, ignore_index, colors).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * color
    keep = (labels == ignore_index)[..., None]
    return np.where(keep, image, blended).round().astype(np.uint8)


def save_label_png(labels: np.ndarray, path: str, colors: Sequence[Sequence[int]] | None = None) -> None:
    """Write a label map: palette PNG for labels < 256 (pixel values are the class indices), else 16-bit."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if labels.max(initial=0) < 256:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette(_full_palette(colors)[:256].reshape(-1).tolist())
    else:
        img = Image.fromarray(labels.astype(np.uint16))
    img.save(path)


def save_rgb_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(image).save(path)


def draw_instances(
    image: np.ndarray,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Masks (N, H, W) bool and boxes (N, 4) xyxy drawn on an (H, W, 3) uint8 image, one color per class."""
    img = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    if len(boxes) == 0:
        return image
    colors = [tuple(int(v) for v in palette(256)[(int(lab) % 255) + 1]) for lab in labels]
    if masks is not None and len(masks):
        img = draw_segmentation_masks(img, masks.bool().cpu(), alpha=0.5, colors=colors)
    text = []
    for i, lab in enumerate(labels.tolist()):
        name = class_names[lab] if class_names is not None and 0 <= lab < len(class_names) else str(lab)
        text.append(f"{name} {scores[i]:.2f}" if scores is not None else name)
    img = draw_bounding_boxes(img, boxes.detach().float().cpu(), labels=text, colors=colors, width=2)
    return img.permute(1, 2, 0).numpy()
