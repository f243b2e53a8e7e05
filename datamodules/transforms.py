"""Augmentations shared by the 2D datamodules, as albumentations 2.x transforms.

The recipes follow the papers' code bases:

- ``RescaleToFit``: mmseg ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``
  (and, without ``ratio_range``, mmseg's test-time ``Resize(scale=(2048, 512), keep_ratio=True)``).
- ``RandomCropCatMax``: mmseg ``RandomCrop(crop_size, cat_max_ratio=0.75)``.
- ``PhotoMetricDistortion``: mmseg's brightness / contrast / saturation / hue jitter.
- ``ResizeShortestEdge``: detectron2's multi-scale resize used by the Mask R-CNN 1x/3x recipes.

Images are uint8 HWC until ``A.Normalize``; label maps are resized with nearest neighbour.

Example:
    >>> import albumentations as A
    >>> t = A.Compose([RescaleToFit((2048, 512), (0.5, 2.0)), RandomCropCatMax(512, 512)])
"""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from ._common import check_number, check_sizes, check_span

__all__ = ["PhotoMetricDistortion", "RandomCropCatMax", "RescaleToFit", "ResizeShortestEdge", "to_chw_tensor"]


def _resize(img: np.ndarray, factor: float, nearest: bool) -> np.ndarray:
    h, w = img.shape[:2]
    # NOTE: int(x + 0.5) rounding, as mmcv.imrescale does
    new_w, new_h = max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5))
    if (new_h, new_w) == (h, w):
        return img
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(img, (new_w, new_h), interpolation=interp)


class _ScaleTransform(A.DualTransform):
    """Base: one isotropic scale factor per call; boxes are normalized so they do not change."""

    def apply(self, img: np.ndarray, factor: float = 1.0, **params: Any) -> np.ndarray:
        return _resize(img, factor, nearest=False)

    def apply_to_mask(self, mask: np.ndarray, factor: float = 1.0, **params: Any) -> np.ndarray:
        return _resize(mask, factor, nearest=True)

    def apply_to_masks(self, masks: np.ndarray, factor: float = 1.0, **params: Any) -> np.ndarray:
        if len(masks) == 0:
            return masks
        return np.stack([_resize(m, factor, nearest=True) for m in masks])

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # albumentations keeps boxes normalized to [0, 1]: scale invariant


class RescaleToFit(_ScaleTransform):
    """Rescale keeping the aspect ratio so the image fits in ``scale`` (long, short) times a
    random ratio, exactly mmseg's ``RandomResize(..., keep_ratio=True)``.

    Args:
        scale: (long_edge, short_edge) bound, e.g. (2048, 512) for ADE20K.
        ratio_range: (low, high) for the random ratio; None for a fixed rescale (validation).
        p: probability.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] | None = None, p: float = 1.0) -> None:
        super().__init__(p=p)
        scale = check_sizes("scale", scale, 2, "(2048, 512)")
        self.scale = (max(scale), min(scale))
        self.ratio_range = None if ratio_range is None else check_span("ratio_range", ratio_range, True, "(0.5, 2.0)")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        long_edge, short_edge = self.scale
        if self.ratio_range is not None:  # mmcv's RandomResize: the scaled bound in whole pixels first
            ratio = self.py_random.uniform(*self.ratio_range)
            long_edge, short_edge = int(long_edge * ratio), int(short_edge * ratio)
        return {"factor": min(long_edge / max(h, w), short_edge / min(h, w))}


class ResizeShortestEdge(_ScaleTransform):
    """Resize the short side to a size drawn from ``short_sizes``, capping the long side at
    ``max_size`` (detectron2 ``ResizeShortestEdge``, torchvision ``GeneralizedRCNNTransform``).

    Args:
        short_sizes: candidate short-side lengths (one is chosen uniformly per image).
        max_size: bound on the long side.
        p: probability.
    """

    def __init__(self, short_sizes: Sequence[int], max_size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.short_sizes = check_sizes("short_sizes", short_sizes, None, "(640, 672, 704)")
        self.max_size = check_sizes("max_size", max_size, 1, "1333")[0]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        short = self.py_random.choice(self.short_sizes)
        factor = short / min(h, w)
        if max(h, w) * factor > self.max_size:
            factor = self.max_size / max(h, w)
        return {"factor": factor}


class RandomCropCatMax(A.DualTransform):
    """Random crop of at most (height, width); up to ``max_tries`` crops are drawn until no single
    class covers more than ``cat_max_ratio`` of the labelled pixels (mmseg ``RandomCrop``).

    Args:
        height, width: crop size; an image smaller than that is cropped to its own size
            (pad afterwards).
        cat_max_ratio: 1.0 disables the class-balance check.
        ignore_index: label value not counted.
        max_tries: crops drawn before the last one is accepted ("where feasible").
        p: probability.
    """

    def __init__(
        self, height: int, width: int, cat_max_ratio: float = 0.75, ignore_index: int = 255,
        max_tries: int = 10, p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.height, self.width = check_sizes("crop size (height, width)", (height, width), 2, "(512, 512)")
        check_number("cat_max_ratio", cat_max_ratio, 0, 1, lo_open=True, example="0.75 (1: no limit)")
        self.cat_max_ratio, self.ignore_index, self.max_tries = float(cat_max_ratio), int(ignore_index), int(max_tries)

    def _draw(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.height, h), min(self.width, w)
        y0 = self.py_random.randint(0, h - ch)
        x0 = self.py_random.randint(0, w - cw)
        return y0, x0, y0 + ch, x0 + cw

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        box = self._draw(h, w)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                crop = mask[box[0]:box[2], box[1]:box[3]]
                _, counts = np.unique(crop[crop != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._draw(h, w)
        return {"box": box}

    def apply(self, img: np.ndarray, box: tuple[int, ...] = (0, 0, 0, 0), **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img[box[0]:box[2], box[1]:box[3]])

    def apply_to_mask(self, mask: np.ndarray, box: tuple[int, ...] = (0, 0, 0, 0), **params: Any) -> np.ndarray:
        return np.ascontiguousarray(mask[box[0]:box[2], box[1]:box[3]])


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion.convert``: img * alpha + beta, clipped, back to uint8."""
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg's photometric distortion on uint8 RGB, each step with probability 1/2:
    brightness +-32, contrast x[0.5, 1.5] (before or after the HSV steps), saturation
    x[0.5, 1.5], hue +-18 (OpenCV's 0..180 hue scale). As mmseg, every step returns uint8 and
    saturation and hue each take their own HSV round trip.

    Args:
        brightness_delta, contrast_range, saturation_range, hue_delta: as in mmseg.
        p: probability of running the whole distortion.
    """

    def __init__(
        self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18, p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = int(check_number("brightness_delta", brightness_delta, 0, 255, example="32"))
        self.contrast_range = check_span("contrast_range", contrast_range, False, "(0.5, 1.5)", "factors ")
        self.saturation_range = check_span("saturation_range", saturation_range, False, "(0.5, 1.5)", "factors ")
        self.hue_delta = int(check_number("hue_delta", hue_delta, 0, 180, example="18"))

    def get_params(self) -> dict[str, Any]:
        r = self.py_random
        coin = lambda: r.random() < 0.5  # noqa: E731
        return {
            "brightness": r.uniform(-self.brightness_delta, self.brightness_delta) if coin() else None,
            "contrast_first": coin(),
            "contrast": r.uniform(*self.contrast_range) if coin() else None,
            "saturation": r.uniform(*self.saturation_range) if coin() else None,
            # numpy's randint(-d, d) in mmseg: the upper end is excluded
            "hue": (r.randint(-self.hue_delta, self.hue_delta - 1) if self.hue_delta > 0 else 0) if coin() else None,
        }

    def apply(self, img: np.ndarray, brightness: float | None = None, contrast_first: bool = True,
              contrast: float | None = None, saturation: float | None = None, hue: int | None = None,
              **params: Any) -> np.ndarray:
        if img.dtype != np.uint8:
            raise TypeError("PhotoMetricDistortion expects uint8 RGB; put it before A.Normalize")
        out = img
        if brightness is not None:
            out = _convert(out, beta=brightness)
        if contrast is not None and contrast_first:
            out = _convert(out, alpha=contrast)
        if saturation is not None:
            hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if hue is not None:
            hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + hue) % 180).astype(np.uint8)
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast is not None and not contrast_first:
            out = _convert(out, alpha=contrast)
        return np.ascontiguousarray(out)


def to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC array -> CHW float32 tensor (no scaling)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
