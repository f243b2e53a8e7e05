"""Gaussian-weighted sliding-window inference over volumes (nnU-Net's scheme).

Windows of ``patch_size`` are laid out per axis as in nnU-Net: ``n = ceil((size - patch) /
(patch * (1 - overlap))) + 1`` windows spread evenly from the first to the last voxel, so that
every window lies inside the volume and the step is at most ``patch * (1 - overlap)``. A volume
smaller than the patch along an axis is zero-padded (centred) to the patch and the output cropped
back. Each window's output is weighted by a Gaussian importance map (sigma = patch / 8 per axis,
peak 1, floored at its smallest positive value so that no voxel has zero weight) and the weighted
sum is divided by the summed weights. Optional mirroring test-time augmentation averages the
outputs of all 2^k flips over the chosen axes.

The network runs on ``device``; the two accumulation buffers (logits and weights, fp32) live on
``buffer_device``: by default the network's device when they fit in its free memory (with
headroom) and the CPU otherwise, so a whole-body CT can be segmented on a GPU that cannot hold
its logits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["gaussian_importance_map", "sliding_window_inference_3d", "window_starts"]

_BUFFER_HEADROOM = 0.5  # use at most this share of the free GPU memory for the buffers


@lru_cache(maxsize=8)
def _gaussian_cpu(patch_size: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
    axes = []
    for p in patch_size:
        x = torch.arange(p, dtype=torch.float64) - (p // 2)  # peak at the centre voxel p // 2 (nnU-Net)
        axes.append(torch.exp(-0.5 * (x / max(p * sigma_scale, 1e-6)) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = (g / g.max()).float()
    positive = g[g > 0]
    return g.clamp_min(float(positive.min()))


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """(pD, pH, pW) float32 Gaussian, sigma = ``sigma_scale`` * patch per axis, max 1, no zeros.
    A new tensor each call (the cached map is never handed out: an in-place edit would change
    every later sliding-window run)."""
    return _gaussian_cpu(tuple(int(p) for p in patch_size), float(sigma_scale)).to(device or "cpu", copy=True)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (``size >= patch``)."""
    if size <= patch:
        return [0]
    target_step = patch * (1.0 - overlap)
    n = math.ceil((size - patch) / target_step) + 1
    step = (size - patch) / (n - 1)
    return [int(round(step * i)) for i in range(n)]


def _resolve_buffer_device(buffer_device: torch.device | str | None, device: torch.device,
                           nbytes: int) -> torch.device:
    if buffer_device not in (None, "auto"):
        return torch.device(buffer_device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return device if nbytes < _BUFFER_HEADROOM * free else torch.device("cpu")
    return device


def _flip_sets(mirror_axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    if not mirror_axes:
        return [()]
    axes = sorted({int(a) for a in mirror_axes})
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror_axes are spatial axes 0 (D), 1 (H), 2 (W), got {list(mirror_axes)}")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def sliding_window_inference_3d(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mirror_axes: Sequence[int] | None = None,
    importance: str = "gaussian",
    sigma_scale: float = 1.0 / 8,
    device: torch.device | str | None = None,
    buffer_device: torch.device | str | None = "auto",
) -> torch.Tensor:
    """Whole-volume output of a patch network by Gaussian-weighted sliding windows.

    Args:
        predict: maps (n, C, pD, pH, pW) windows to (n, K, pD, pH, pW) outputs (logits).
        image: (B, C, D, H, W) volumes, on any device (windows are moved to ``device``).
        patch_size: window (pD, pH, pW).
        overlap: fraction of the window shared by neighbours along each axis, in [0, 1).
        sw_batch_size: windows per ``predict`` call.
        mirror_axes: spatial axes (0 = D, 1 = H, 2 = W) for mirroring test-time augmentation;
            all 2^k flip combinations are averaged. None: no augmentation.
        importance: "gaussian" or "constant" (plain average of overlaps).
        sigma_scale: Gaussian sigma as a fraction of the patch (nnU-Net: 1/8).
        device: where ``predict`` runs (default: ``image.device``).
        buffer_device: where the accumulation buffers live; "auto" (default) = ``device`` when
            they fit in half its free memory, else the CPU.

    Returns:
        (B, K, D, H, W) float32 on the buffer device.

    Example:
        >>> net = torch.nn.Conv3d(1, 3, 3, padding=1)
        >>> sliding_window_inference_3d(net, torch.randn(1, 1, 40, 50, 20), (32, 32, 32)).shape
        torch.Size([1, 3, 40, 50, 20])
    """
    if image.dim() != 5:
        raise ValueError(f"expected (B, C, D, H, W) volumes, got shape {tuple(image.shape)}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive sizes (D, H, W), got {patch_size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if importance not in ("gaussian", "constant"):
        raise ValueError(f"importance must be 'gaussian' or 'constant', got {importance!r}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    device = torch.device(device) if device is not None else image.device
    flips = _flip_sets(mirror_axes)

    size = tuple(image.shape[2:])
    pad = [max(p - s, 0) for p, s in zip(patch, size)]
    before = [d // 2 for d in pad]
    if any(pad):  # F.pad lists the last axis first
        image = F.pad(image, [v for d, b in zip(reversed(pad), reversed(before)) for v in (b, d - b)])
    full = tuple(image.shape[2:])
    starts = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(full, patch))))
    weight_win = (gaussian_importance_map(patch, sigma_scale, device) if importance == "gaussian"
                  else torch.ones(patch, device=device))

    outputs = []
    for b in range(image.shape[0]):
        logits = weights = None
        for i in range(0, len(starts), sw_batch_size):
            chunk = starts[i : i + sw_batch_size]
            windows = torch.stack([
                image[b, :, z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in chunk
            ]).to(device, non_blocking=True)
            out = None
            for axes in flips:
                dims = [a + 2 for a in axes]
                pred = predict(windows.flip(dims) if dims else windows).float()
                pred = pred.flip(dims) if dims else pred
                out = pred if out is None else out + pred
            out = out / len(flips)
            if tuple(out.shape[2:]) != patch:
                raise ValueError(f"predict returned spatial size {tuple(out.shape[2:])} for windows of {patch}; "
                                 "it must keep the window size")
            out = out * weight_win
            if logits is None:  # allocate once the number of output channels is known
                k = out.shape[1]
                buf = _resolve_buffer_device(buffer_device, device, (k + 1) * math.prod(full) * 4)
                try:
                    logits = torch.zeros((k, *full), dtype=torch.float32, device=buf)
                    weights = torch.zeros(full, dtype=torch.float32, device=buf)
                except torch.OutOfMemoryError:
                    buf = torch.device("cpu")
                    logits = torch.zeros((k, *full), dtype=torch.float32, device=buf)
                    weights = torch.zeros(full, dtype=torch.float32, device=buf)
                w_buf = weight_win.to(buf)
            out = out.to(logits.device, non_blocking=False)
            for (z, y, x), o in zip(chunk, out):
                logits[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]] += o
                weights[z : z + patch[0], y : y + patch[1], x : x + patch[2]] += w_buf
        logits /= weights
        crop = tuple(slice(bf, bf + s) for bf, s in zip(before, size))
        outputs.append(logits[(slice(None), *crop)])
    return torch.stack(outputs) if len(outputs) > 1 else outputs[0][None]
