"""Semantic-segmentation inference on large inputs: whole-image and sliding-window modes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"Expected an int or (height, width), got {v!r}.")
    return (int(v[0]), int(v[1]))


def gaussian_weights(height: int, width: int, sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """(height, width) Gaussian blending map, 1 at the centre, sigma = sigma_scale * size (nnU-Net)."""
    ys = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    gy = torch.exp(-0.5 * (ys / max(sigma_scale * height, 1e-6)) ** 2)
    gx = torch.exp(-0.5 * (xs / max(sigma_scale * width, 1e-6)) ** 2)
    w = gy[:, None] * gx[None, :]
    return w.clamp_min(1e-3)  # never zero: every pixel keeps some weight from each window


def sliding_window_inference(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    window: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    blend: str = "mean",
) -> torch.Tensor:
    """Logits of a large image from overlapping windows (mmseg `slide_inference`).

    Windows start every `stride` pixels; the last window in each axis is shifted back to end at
    the border, so every window lies inside the image (an image smaller than the window is one
    window of its own size). Overlaps are averaged ("mean") or Gaussian-weighted ("gaussian").

    Args:
        predict: maps a (B, C, h, w) crop to (B, num_classes, h, w) logits.
        image: (B, C, H, W).
        num_classes: channels of the logits.
        window, stride: (height, width) or one int; stride <= window.
        blend: "mean" or "gaussian".

    Returns:
        (B, num_classes, H, W) blended logits.
    """
    wh, ww = _pair(window)
    sh, sw = _pair(stride)
    if min(wh, ww, sh, sw) <= 0:
        raise ValueError(f"window {window!r} and stride {stride!r} must be positive.")
    if sh > wh or sw > ww:
        raise ValueError(f"stride {stride!r} larger than window {window!r} would leave pixels unpredicted.")
    if blend not in ("mean", "gaussian"):
        raise ValueError(f"blend must be 'mean' or 'gaussian', got {blend!r}.")
    b, _, h, w = image.shape
    ny = max(h - wh + sh - 1, 0) // sh + 1
    nx = max(w - ww + sw - 1, 0) // sw + 1
    logits = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    weight = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for iy in range(ny):
        for ix in range(nx):
            y2, x2 = min(iy * sh + wh, h), min(ix * sw + ww, w)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            out = predict(image[:, :, y1:y2, x1:x2]).float()
            if blend == "gaussian":
                wmap = gaussian_weights(y2 - y1, x2 - x1, device=image.device)[None, None]
            else:
                wmap = torch.ones((1, 1, y2 - y1, x2 - x1), device=image.device)
            logits[:, :, y1:y2, x1:x2] += out * wmap
            weight[:, :, y1:y2, x1:x2] += wmap
    return logits / weight


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, K, h, w) logits to `size` (no-op when equal)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
