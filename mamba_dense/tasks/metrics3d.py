"""Volume metrics: per-structure Dice and HD95 in mm, with a stated rule for empty masks.

Definitions (masks are boolean (D, H, W) arrays on one voxel grid; ``spacing`` is the voxel size
in mm along D, H, W):

- Dice = 2 |P & G| / (|P| + |G|).
- Surface: the mask voxels with at least one 6-neighbour outside the mask (the volume border
  counts as outside).
- HD95 = max(p95(d(S_P, G)), p95(d(S_G, P))): the larger of the two directed 95th percentiles
  of the distances (mm, Euclidean with the voxel spacing) from each surface voxel of one mask
  to the nearest surface voxel of the other; percentiles linearly interpolated. This is MONAI's
  ``compute_hausdorff_distance(percentile=95)`` (MedPy's ``hd95`` takes the percentile of the
  pooled distances instead and can be lower).

Empty masks (``EMPTY_RULE``): a structure absent from both prediction and ground truth is a
correct result, Dice 1 and HD95 0 mm. A structure present in only one of them scores Dice 0 and
HD95 = the diagonal of the volume in mm (sqrt(sum((n_i * s_i)^2))), the largest distance possible
in the image; for a 240 x 240 x 155 volume at 1 mm this is the 373.13 mm of the BraTS challenge.
Every case therefore has a finite value and means are never taken over silently skipped cases;
``MetricRow.gt_empty`` / ``pred_empty`` say which rule applied.

Distances use ``scipy.ndimage.distance_transform_edt`` when scipy is installed (cropped to the
masks' bounding box, which is exact), and a chunked brute-force nearest-point search in torch
otherwise (also the test oracle).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional: exact Euclidean distance transform
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - exercised only without scipy
    _ndimage = None

EMPTY_RULE = (
    "both empty: Dice 1, HD95 0 mm; one empty: Dice 0, HD95 = volume diagonal in mm (BraTS: 373.13 mm)"
)

__all__ = [
    "EMPTY_RULE",
    "MetricRow",
    "dice_coefficient",
    "hausdorff_distance",
    "mask_surface",
    "score_case",
    "summarize",
    "summary_table",
    "write_csv",
]


def _as_bool_tensor(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(mask)
    if t.dim() != 3:
        raise ValueError(f"expected a (D, H, W) mask, got shape {tuple(t.shape)}")
    return t.bool()


def dice_coefficient(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (see ``EMPTY_RULE``)."""
    p, g = _as_bool_tensor(pred), _as_bool_tensor(target)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(g.shape)} differ in shape")
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((p & g).sum()) / total


def mask_surface(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Boolean (D, H, W) surface: mask voxels with a 6-neighbour outside the mask or the volume."""
    m = _as_bool_tensor(mask)
    x = F.pad(m[None, None].float(), (1, 1, 1, 1, 1, 1))  # outside the volume = background
    k = torch.zeros(1, 1, 3, 3, 3, device=x.device)
    k[0, 0, 1, 1, :] = k[0, 0, 1, :, 1] = k[0, 0, :, 1, 1] = 1  # centre + 6 neighbours = 7
    inside = F.conv3d(x, k)[0, 0] > 6.5
    return m & ~inside


def _bbox(mask: torch.Tensor) -> tuple[slice, ...]:
    idx = torch.nonzero(mask)
    lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
    return tuple(slice(a, b + 1) for a, b in zip(lo, hi))


def _directed_distances(src: torch.Tensor, dst: torch.Tensor, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every True voxel of ``src`` to the nearest True voxel of ``dst``."""
    if _ndimage is not None:
        edt = _ndimage.distance_transform_edt(~dst.cpu().numpy(), sampling=[float(s) for s in spacing])
        return edt[src.cpu().numpy()]
    return _brute_force_distances(src, dst, spacing)


def _brute_force_distances(src: torch.Tensor, dst: torch.Tensor, spacing: Sequence[float],
                           chunk: int = 4096) -> np.ndarray:
    """Nearest-point search between voxel sets in chunks (no scipy; the tests' oracle)."""
    scale = torch.tensor([float(s) for s in spacing], dtype=torch.float64, device=src.device)
    a = torch.nonzero(src).double() * scale
    b = torch.nonzero(dst).double() * scale
    out = [torch.cdist(a[i : i + chunk], b).min(1).values for i in range(0, len(a), chunk)]
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def _diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return math.sqrt(sum((n * float(s)) ** 2 for n, s in zip(shape, spacing)))


def hausdorff_distance(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                       spacing: Sequence[float] = (1.0, 1.0, 1.0), percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance in mm (HD95 by default; 100 = classic Hausdorff).

    Args:
        pred, target: boolean (D, H, W) masks on the same grid.
        spacing: voxel size (mm) along D, H, W.
        percentile: of each directed distance set; the larger of the two is returned.

    Returns:
        the distance in mm; 0 when both masks are empty, the volume diagonal when one is.
    """
    p, g = _as_bool_tensor(pred), _as_bool_tensor(target)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(g.shape)} differ in shape")
    if len(spacing) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three finite positive voxel sizes (mm) along D, H, W, got {spacing}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return _diagonal(p.shape, spacing)
    box = _bbox(p | g)  # every surface voxel lies in the union's box: cropping is exact
    sp, sg = mask_surface(p[box]), mask_surface(g[box])
    d_pg = _directed_distances(sp, sg, spacing)
    d_gp = _directed_distances(sg, sp, spacing)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


@dataclass
class MetricRow:
    """One structure of one case (a row of the per-case CSV)."""

    case: str
    structure: str
    dice: float
    hd95: float
    gt_voxels: int
    pred_voxels: int
    gt_empty: bool
    pred_empty: bool


def score_case(case: str, pred_masks: torch.Tensor, target_masks: torch.Tensor, names: Sequence[str],
               spacing: Sequence[float], hd95: bool = True) -> list[MetricRow]:
    """Dice (and HD95) of each structure of one case.

    Args:
        case: case name.
        pred_masks, target_masks: (K, D, H, W) boolean, one mask per structure (class or region).
        names: K structure names.
        spacing: voxel size (mm) along D, H, W.
        hd95: compute HD95 (else NaN).

    Returns:
        K ``MetricRow``.
    """
    if pred_masks.shape != target_masks.shape or len(names) != pred_masks.shape[0]:
        raise ValueError(f"masks {tuple(pred_masks.shape)} / {tuple(target_masks.shape)} and {len(names)} names "
                         "must agree: (K, D, H, W) each, K names")
    rows = []
    for k, name in enumerate(names):
        p, g = pred_masks[k].bool(), target_masks[k].bool()
        hd = hausdorff_distance(p.cpu(), g.cpu(), spacing) if hd95 else float("nan")
        npv, ngv = int(p.sum()), int(g.sum())
        rows.append(MetricRow(case, str(name), dice_coefficient(p, g), hd, ngv, npv, ngv == 0, npv == 0))
    return rows


def summarize(rows: Sequence[MetricRow]) -> dict[str, dict[str, float]]:
    """Per structure: mean and std of Dice and HD95 over cases, number of cases and of empty ground truths."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r.structure for r in rows):
        sel = [r for r in rows if r.structure == name]
        dice = np.array([r.dice for r in sel], dtype=np.float64)
        hd = np.array([r.hd95 for r in sel], dtype=np.float64)
        out[name] = {
            "dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
            "hd95_mean": float(np.nanmean(hd)) if np.isfinite(hd).any() else float("nan"),
            "hd95_std": float(np.nanstd(hd)) if np.isfinite(hd).any() else float("nan"),
            "cases": len(sel), "gt_empty": sum(r.gt_empty for r in sel),
        }
    return out


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    """Plain-text table: structure, Dice mean +- std (%), HD95 mean +- std (mm), cases, empty GT."""
    width = max([10, *(len(n) for n in summary)])
    head = f"{'structure':<{width}} {'Dice %':>15} {'HD95 mm':>17} {'cases':>6} {'empty GT':>9}"
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        lines.append(f"{name:<{width}} {100 * s['dice_mean']:7.2f} +- {100 * s['dice_std']:5.2f} "
                     f"{s['hd95_mean']:8.2f} +- {s['hd95_std']:6.2f} {s['cases']:6d} {s['gt_empty']:9d}")
    if summary:
        lines.append("-" * len(head))
        md = np.mean([s["dice_mean"] for s in summary.values()])
        mh = np.nanmean([s["hd95_mean"] for s in summary.values()])
        lines.append(f"{'mean':<{width}} {100 * md:7.2f}          {mh:8.2f}")
    lines.append(f"empty masks: {EMPTY_RULE}")
    return "\n".join(lines)


def write_csv(rows: Sequence[MetricRow], path: str | os.PathLike) -> str:
    """Write the per-case rows as CSV (columns = ``MetricRow`` fields); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(MetricRow)])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    return path
