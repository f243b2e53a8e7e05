"""Geometry shared by the medical datamodule and the volumetric task: a prediction on the common grid back
onto the file's voxel grid. Its own module so that the task (below the datamodules in DESIGN.md's layering)
does not import from the datamodules."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as ornts

__all__ = ["restore_original_space"]


def restore_original_space(pred: np.ndarray | torch.Tensor, geom: dict[str, Any]) -> np.ndarray:
    """(D, H, W) class map on the returned grid -> array on the file's voxel grid (x, y, z),
    to be saved with ``geom["affine"]`` (``nib.Nifti1Image(out, geom["affine"])``)."""
    def arr(v: Any) -> np.ndarray:
        return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)

    pred_t = torch.as_tensor(arr(pred))
    common = [int(s) for s in arr(geom["common_shape"]).reshape(-1)]
    if list(pred_t.shape) != common:
        pred_t = F.interpolate(pred_t[None, None].float(), size=common, mode="nearest-exact")[0, 0]
    out = pred_t.numpy().transpose(2, 1, 0)  # back to (x, y, z) in the common orientation
    tr = arr(geom["ornt"]).reshape(3, 2)
    return np.ascontiguousarray(ornts.apply_orientation(out, _invert_ornt(tr)))


def _invert_ornt(tr: np.ndarray) -> np.ndarray:
    """Orientation transform undoing ``tr`` (axis ``i`` went to ``tr[i, 0]`` with flip ``tr[i, 1]``)."""
    inv = np.empty_like(tr)
    for i, (axis, flip) in enumerate(tr):
        inv[int(axis)] = [i, flip]
    return inv
