"""Volume machinery for the medical datamodule: NIfTI reading with clear errors, reorientation,
resampling, intensity normalization, patch sampling and 3D augmentation.

Arrays leave this module as (C, D, H, W) images and (D, H, W) labels in a common orientation
(RAS by default), with D, H, W = the z, y, x axes of the reoriented volume.
"""

from __future__ import annotations

import math
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as ornts

from mamba_dense._geometry import restore_original_space

from ._common import DataError

__all__ = [
    "CaseGeometry",
    "ct_normalize",
    "intensity_augment",
    "load_nifti_array",
    "nonzero_zscore",
    "random_flip",
    "read_case",
    "restore_original_space",
    "sample_patch",
    "to_common_space",
]


def load_nifti_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a NIfTI file; unreadable files raise ``DataError`` naming them."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: NIfTI file not found. Fix: restore it or correct its dataset.json entry")
    errors = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, EOFError, OSError,
              zlib.error, ValueError, OverflowError)
    try:
        img = nib.load(str(path))  # the header only
    except errors as e:
        raise DataError(path, "NIfTI header/data", f"cannot read ({type(e).__name__}: {e})",
                        "re-extract or re-download the file (truncated .nii.gz files fail here)") from None
    shape, dtype = _check_nifti_header(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except errors as e:
        raise DataError(path, "NIfTI header/data", f"cannot read ({type(e).__name__}: {e})",
                        "re-extract or re-download the file (truncated .nii.gz files fail here)") from None
    except MemoryError:
        raise DataError(path, "dim", f"not enough memory for {shape} voxels of {dtype}",
                        "load it on a machine with more memory, or crop / resample the volume") from None
    if not np.isfinite(img.affine).all():
        raise DataError(path, "affine (sform/qform)", "not finite",
                        "repair the header (e.g. re-save with a valid sform)")
    return data, np.asarray(img.affine, dtype=np.float64)


# DEFLATE cannot expand data by more than 1032:1; a .nii.gz declaring more voxel bytes than this
# bound allows is corrupt (checked before nibabel allocates the declared array).
_MAX_GZIP_RATIO = 1100


def _check_nifti_header(path: Path, img: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Refuse, from the header alone, voxel types that are no image or label (complex, RGB) and
    declared sizes the file cannot hold (a corrupt ``dim`` would make nibabel allocate them)."""
    shape = tuple(int(s) for s in img.shape)
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf":
        what = "RGB(A)" if dtype.names else dtype.name
        raise DataError(path, "datatype", f"{what} voxels (NIfTI datatype {dtype}) are not intensities or class "
                        "indices", "store images as int16/float32 (one file or 4D channel per modality) and labels "
                        "as uint8/int16 class indices")
    need = dtype.itemsize * int(np.prod(shape, dtype=object))
    data_file = Path(img.file_map["image"].filename or path)
    try:
        size = data_file.stat().st_size
    except OSError:
        return shape, dtype  # the reader reports it
    suffix = data_file.suffix.lower()
    limit = size * _MAX_GZIP_RATIO if suffix == ".gz" else (size if suffix in (".nii", ".img") else None)
    if limit is not None and need > limit:
        need_s = f"{float(need):.3g}" if need.bit_length() < 1000 else f"~2^{need.bit_length()}"
        raise DataError(path, "dim (header)", f"declares {shape} voxels of {dtype} ({need_s} bytes) but a "
                        f"{size}-byte {suffix} file holds at most {limit:.3g}",
                        "the header is corrupt: re-extract or re-download the file")
    return shape, dtype


def read_case(image_paths: Sequence[Path], label_path: Path | None, num_modalities: int,
              num_classes: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Load one case as (X, Y, Z, C) float32 image, (X, Y, Z) int64 label (or None) and the affine.

    MSD images are 3D for one modality or 4D with the modalities last; a list of 3D files (one
    per modality) is also accepted. Shapes, dims and label values are checked against
    ``dataset.json``.
    """
    channels, affine, first = [], None, Path(image_paths[0])
    for p in image_paths:
        data, aff = load_nifti_array(Path(p))
        if data.ndim == 4 and len(image_paths) == 1 and data.shape[3] == num_modalities:
            channels.extend(np.moveaxis(data, 3, 0))
        elif data.ndim == 3 or (data.ndim == 4 and data.shape[3] == 1):
            channels.append(data.reshape(data.shape[:3]))
        else:
            raise DataError(p, "dim", f"image shape {data.shape} does not fit {num_modalities} modality(ies)",
                            f"expected 3D (x, y, z) per modality or 4D (x, y, z, {num_modalities}) with modalities "
                            "last; check dataset.json 'modality'")
        if channels[-1].shape != channels[0].shape:
            raise DataError(p, "shape", f"{channels[-1].shape} differs from {first.name} {channels[0].shape}",
                            "all modalities of a case must share one voxel grid")
        if affine is not None and not np.allclose(aff, affine, atol=1e-3, rtol=1e-3):
            raise DataError(p, "affine", f"differs from {first.name}'s (max difference {np.abs(aff - affine).max():.4g})",
                            "all modalities of a case must share one voxel grid: resample onto the first one")
        affine = aff if affine is None else affine
    if len(channels) != num_modalities:
        raise DataError(first, "modalities", f"{len(channels)} channel(s) but dataset.json lists {num_modalities}",
                        "fix dataset.json 'modality' or the image file")
    image = np.stack(channels, axis=-1).astype(np.float32)
    finite = np.isfinite(image).all(axis=(0, 1, 2))
    if not finite.all():  # NaN voxels, or values (scl_slope scaling included) beyond float32
        c = int(np.flatnonzero(~finite)[0])
        bad = Path(image_paths[c]) if len(image_paths) == len(channels) else first
        raise DataError(bad, "voxel values", f"{int((~np.isfinite(image[..., c])).sum())} NaN or infinite voxel(s) "
                        f"in channel {c} (after the header's scl_slope/scl_inter, as float32)",
                        "replace them (e.g. by 0 or the background value) or repair the header's scaling")
    if label_path is None:
        return image, None, affine
    raw, lab_aff = load_nifti_array(Path(label_path))
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise DataError(label_path, "dim", f"label shape {raw.shape}", "labels must be 3D class-index volumes")
    raw, lab_aff = _onto_image_axes(raw, lab_aff, affine, image.shape[:3])
    if raw.shape != image.shape[:3]:
        raise DataError(label_path, "shape", f"label {raw.shape} vs image {first.name} {image.shape[:3]}",
                        "resample the label onto the image grid (or pair the right files)")
    if not np.allclose(lab_aff, affine, atol=1e-3, rtol=1e-3):
        # NOTE: same shape but another grid (spacing, orientation or origin): voxels would not correspond
        raise DataError(label_path, "affine", f"differs from image {first.name}'s (max difference "
                        f"{np.abs(lab_aff - affine).max():.4g}): the label lies on another voxel grid",
                        "resample the label onto the image grid, or re-save it with the image's affine if only the "
                        "header is wrong (a label stored with flipped or permuted axes is already reoriented)")
    values = np.unique(raw)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise DataError(label_path, "voxel values", "NaN or infinite label values", "store class indices")
        rounded = np.rint(values)
        off = values[np.abs(values - rounded) > 1e-3]
        if off.size:  # BraTS and others store labels as float32: integral values are fine, others rounded
            warnings.warn(f"{label_path}: voxel values: {int(np.isin(raw, off).sum())} non-integer label value(s) "
                          f"{[round(float(v), 4) for v in off[:6]]} rounded to the nearest class. Fix: resample labels with nearest "
                          "neighbour", stacklevel=2)
        values = np.unique(rounded)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(label_path, "voxel values", f"values {bad[:6].tolist()} outside the dataset.json labels "
                        f"0..{num_classes - 1}", "fix the label file or add the classes to dataset.json 'labels'")
    return image, np.rint(raw).astype(np.int64), affine


def _onto_image_axes(raw: np.ndarray, lab_aff: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]):
    """The label array in the image's axis order and directions when the two files store the same voxel
    grid with flipped or permuted axes (e.g. an LAS label next to an RAS image): a lossless reorientation.
    Otherwise the label unchanged (the caller's shape and affine checks then name the mismatch)."""
    try:
        t = ornts.ornt_transform(ornts.io_orientation(lab_aff), ornts.io_orientation(affine))
    except ValueError:  # a degenerate affine: leave it to the checks
        return raw, lab_aff
    if (t == [[0, 1], [1, 1], [2, 1]]).all():
        return raw, lab_aff
    moved = ornts.apply_orientation(raw, t)
    moved_aff = lab_aff @ ornts.inv_ornt_aff(t, raw.shape)
    if moved.shape == tuple(shape) and np.allclose(moved_aff, affine, atol=1e-3, rtol=1e-3):
        return moved, moved_aff
    return raw, lab_aff


class CaseGeometry(dict):
    """What is needed to map a prediction back to the file's voxel grid (a plain dict so the
    default collate handles it): ``affine`` (4, 4), ``ornt`` (3, 2) file -> common orientation,
    ``original_shape`` (3,) on disk, ``common_shape`` (3,) (D, H, W) before resampling,
    ``spacing`` (3,) mm of the returned (D, H, W) grid."""


def check_orientation(orientation: Any) -> str:
    """Upper-cased axis codes, one of each of L/R, A/P, S/I (e.g. "RAS", "LPS"); else ValueError."""
    codes = orientation.upper() if isinstance(orientation, str) else ""
    if len(codes) != 3 or sorted("LRAPSI".index(c) // 2 for c in codes if c in "LRAPSI") != [0, 1, 2]:
        raise ValueError(f"orientation={orientation!r}: expected 3 axis codes naming each of L/R, A/P and S/I "
                         "once (the directions of increasing x, y, z). Fix: e.g. orientation='RAS' or 'LPS'")
    return codes


def check_spacing(target_spacing: Any) -> tuple[float, float, float] | None:
    """``target_spacing`` as 3 floats > 0 (or None); else ValueError."""
    if target_spacing is None:
        return None
    try:
        spacing = tuple(float(v) for v in target_spacing)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"target_spacing={target_spacing!r}: expected 3 finite spacings > 0 in mm (D, H, W). "
                         "Fix: e.g. target_spacing=(1.5, 1.5, 1.5), or None to keep each file's spacing")
    return spacing  # type: ignore[return-value]


def to_common_space(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, orientation: str = "RAS",
                    target_spacing: Sequence[float] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray | None, CaseGeometry]:
    """(X, Y, Z, C) image + label in file order -> (C, D, H, W) / (D, H, W) in ``orientation``,
    optionally resampled to ``target_spacing`` (D, H, W order, mm): trilinear image, nearest label."""
    orientation, target_spacing = check_orientation(orientation), check_spacing(target_spacing)
    original_shape = image.shape[:3]
    tr = ornts.ornt_transform(ornts.io_orientation(affine), ornts.axcodes2ornt(tuple(orientation)))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    spacing_xyz = np.empty(3)
    spacing_xyz[tr[:, 0].astype(int)] = zooms
    image = ornts.apply_orientation(image, tr)  # channels last stay last
    image = np.ascontiguousarray(image.transpose(3, 2, 1, 0))  # (C, Z, Y, X) = (C, D, H, W)
    if label is not None:
        label = np.ascontiguousarray(ornts.apply_orientation(label, tr).transpose(2, 1, 0))
    spacing = spacing_xyz[::-1].copy()
    common_shape = image.shape[1:]
    if target_spacing is not None:
        new_shape = [max(1, int(round(s * sp / t))) for s, sp, t in zip(common_shape, spacing, target_spacing)]
        if list(new_shape) != list(common_shape):
            image = F.interpolate(torch.from_numpy(image)[None], size=new_shape, mode="trilinear",
                                  align_corners=False)[0].numpy()
            if label is not None:
                label = F.interpolate(torch.from_numpy(label)[None, None].float(), size=new_shape,
                                      mode="nearest-exact")[0, 0].numpy().astype(np.int64)
        spacing = np.array([sp * c / n for sp, c, n in zip(spacing_xyz[::-1], common_shape, new_shape)])
    geom = CaseGeometry(affine=affine, ornt=tr, original_shape=np.array(original_shape),
                        common_shape=np.array(common_shape), spacing=spacing)
    return image, label, geom


def ct_normalize(x: np.ndarray, stats: dict[str, float]) -> np.ndarray:
    """Clip to the foreground 0.5/99.5 percentiles, z-score with the dataset's foreground mean/std."""
    x = np.clip(x, stats["p00_5"], stats["p99_5"])
    return (x - stats["mean"]) / max(stats["std"], 1e-8)


def nonzero_zscore(x: np.ndarray) -> np.ndarray:
    """Per-image z-score over nonzero voxels; background (0) stays 0 (MR convention)."""
    mask = x != 0
    if not mask.any():
        return np.zeros_like(x)
    vals = x[mask]
    out = np.zeros_like(x)
    out[mask] = (vals - vals.mean()) / max(float(vals.std()), 1e-8)
    return out


def sample_patch(image: np.ndarray, label: np.ndarray, patch: Sequence[int], rng: np.random.Generator,
                 fg_voxels: dict[int, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Crop a (C, *patch) / (*patch) patch; centred on a foreground voxel of a random present
    class when ``fg_voxels`` (class -> (N, 3) voxel indices) is given, uniform otherwise.
    Volumes smaller than the patch are padded (image 0, label 0 = background)."""
    shape = np.array(label.shape)
    need = np.maximum(np.array(patch) - shape, 0)
    if need.any():
        pads = [(int(n // 2), int(n - n // 2)) for n in need]
        image = np.pad(image, [(0, 0), *pads])
        label = np.pad(label, pads)
        shape = np.array(label.shape)
        if fg_voxels:
            offset = np.array([p[0] for p in pads])
            fg_voxels = {k: v + offset for k, v in fg_voxels.items()}
    high = shape - np.array(patch)
    classes = [k for k, v in (fg_voxels or {}).items() if len(v)]
    if classes:
        voxels = fg_voxels[classes[int(rng.integers(len(classes)))]]
        centre = voxels[int(rng.integers(len(voxels)))]
        start = np.clip(centre - np.array(patch) // 2, 0, high)
    else:
        start = np.array([int(rng.integers(0, h + 1)) for h in high])
    sl = tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch))
    return np.ascontiguousarray(image[(slice(None), *sl)]), np.ascontiguousarray(label[sl])


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Mirror each spatial axis with probability ``p`` (image and label together)."""
    for axis in range(3):
        if rng.random() < p:
            image, label = np.flip(image, axis + 1), np.flip(label, axis)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def intensity_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net-style intensity augmentation on a normalized (C, D, H, W) patch, each per channel:
    Gaussian noise (p 0.1), brightness x[0.75, 1.25] (p 0.15), contrast x[0.75, 1.25] (p 0.15),
    gamma on the inverted image (p 0.1) and on the image (p 0.3), gamma drawn as nnU-Net does
    (half the time from [0.7, 1), else from [1, 1.5]), the channel's mean and std kept."""
    image = image.astype(np.float32, copy=True)
    for c in range(image.shape[0]):
        x = image[c]
        if rng.random() < 0.1:
            x += rng.normal(0.0, np.sqrt(rng.uniform(0, 0.1)), x.shape).astype(np.float32)
        if rng.random() < 0.15:
            x *= rng.uniform(0.75, 1.25)
        if rng.random() < 0.15:
            mean, lo, hi = x.mean(), x.min(), x.max()
            x[:] = np.clip((x - mean) * rng.uniform(0.75, 1.25) + mean, lo, hi)
        for p_gamma, invert in ((0.1, True), (0.3, False)):
            if rng.random() < p_gamma:
                _gamma(x, rng, invert)
        image[c] = x
    return image


def _gamma(x: np.ndarray, rng: np.random.Generator, invert: bool) -> None:
    """In place: batchgenerators' ``augment_gamma`` (range (0.7, 1.5), retain_stats)."""
    if invert:
        x *= -1
    lo, hi = x.min(), x.max()
    if hi > lo:
        gamma = rng.uniform(0.7, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 1.5)
        mean, std = x.mean(), x.std()
        x[:] = ((x - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
        x[:] = (x - x.mean()) / max(float(x.std()), 1e-8) * std + mean  # keep the statistics
    if invert:
        x *= -1
