"""Bilinear resize as two matrix products (``align_corners=False``, PyTorch's / mmseg's formula).

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` equals ``Ry @ x @ Rx^T`` per
(sample, channel), where ``Ry`` (H x h) and ``Rx`` (W x w) hold the two bilinear weights of each
output row / column. As matrix products the resize

- runs on tensor cores in the input's dtype (under autocast ``F.interpolate`` computes and returns
  fp32, and its channels-last kernels are slow: 13 ms of a 129 ms UPerNet step at 512 x 512);
- has a deterministic backward (two more matrix products; ``upsample_bilinear2d``'s CUDA backward
  adds with atomics);
- keeps channels-last maps channels-last without a copy (the products act on (h, w) of the
  (B, h, w, C) memory).

The weights are the fp32 ones of ``upsample_bilinear2d`` (scale ``in / out`` in fp32, source index
clamped at 0, the +1 neighbour clamped at the border); they are built once per size, dtype and device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

_CACHE: dict[tuple, torch.Tensor] = {}


def bilinear_matrix(n_out: int, n_in: int, n_keep: int | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_keep, n_in) matrix R: ``R @ v`` = the first ``n_keep`` (default all) samples of ``v`` (length
    n_in) bilinearly resized to n_out (``align_corners=False``)."""
    n_keep = n_out if n_keep is None else n_keep
    key = (n_out, n_in, n_keep, dtype, str(device))
    compiling = torch.compiler.is_compiling()
    r = None if compiling else _CACHE.get(key)
    if r is None:
        with contextlib.nullcontext() if compiling else torch.inference_mode(False):
            r = _build(n_out, n_in, n_keep, dtype, device)
        if not compiling:
            if len(_CACHE) > 256:
                _CACHE.clear()
            # built outside inference mode: a matrix first made under Lightning's validate / predict
            # (inference mode) could not be saved for backward by a later training step
            _CACHE[key] = r
    return r


def _build(n_out: int, n_in: int, n_keep: int, dtype: torch.dtype, device) -> torch.Tensor:
    i = torch.arange(n_keep, device=device, dtype=torch.float32)
    scale = float(np.float32(n_in) / np.float32(n_out))  # the fp32 scale of PyTorch's kernels
    s = ((i + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = s.floor()
    lam = (s - i0)[:, None]
    i0 = i0.long()
    i1 = (i0 + 1).clamp_max(n_in - 1)
    cols = torch.arange(n_in, device=device)
    r = (cols == i0[:, None]) * (1.0 - lam) + (cols == i1[:, None]) * lam  # i0 == i1 at the border: 1
    return r.to(dtype)


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for (B, C, h, w) ``x``, as matrix
    products in ``x``'s dtype (the autocast dtype under autocast); channels-last in, channels-last out."""
    H, W = int(size[0]), int(size[1])
    B, C, h, w = x.shape
    if (h, w) == (H, W):
        return x
    dt = x.dtype
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:  # autocast leaves fp64 alone
        dt = torch.get_autocast_dtype(x.device.type)
    ry = bilinear_matrix(H, h, dtype=dt, device=x.device) if h != H else None
    rx = bilinear_matrix(W, w, dtype=dt, device=x.device) if w != W else None
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        t = x.permute(0, 2, 3, 1)  # (B, h, w, C), contiguous
        if rx is not None:
            t = torch.matmul(rx, t)  # (B, h, W, C)
        if ry is not None:
            t = torch.matmul(ry, t.reshape(B, h, W * C)).view(B, H, W, C)
        return t.permute(0, 3, 1, 2)
    t = x
    if rx is not None:
        t = torch.matmul(t, rx.t())  # (B, C, h, W)
    if ry is not None:
        t = torch.matmul(ry, t)  # (B, C, H, W)
    return t
