"""Writers of small synthetic datasets in the real on-disk formats, so demos and tests run the
real readers: ADE20K-layout JPEG/PNG pairs, a COCO instances JSON (polygons, RLE, a crowd
region), and a Medical Segmentation Decathlon task of NIfTI volumes.

Every writer builds the dataset in a ``<root>.partial`` sibling and renames it into place at the
end, so an interrupted write never leaves a half dataset that looks complete; an existing
dataset is never touched (the writer returns at once).

Example:
    >>> root = write_ade20k_like("/tmp/shapes", num_train=8, num_val=2)
    >>> ADE20KDataModule(str(root), num_classes=5, reduce_zero_label=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ._common import DataError

__all__ = ["SHAPE_CLASSES", "write_ade20k_like", "write_coco_like", "write_msd_like"]

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")
_SHAPE_RGB = ((220, 60, 60), (60, 180, 75), (65, 105, 225), (240, 200, 40))
MARKER = "mamba_dense_synthetic.json"


def _atomic_write(root: Path, params: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmp)`` on an empty temp folder, then move it to ``root`` (unless present). A
    present ``root`` written by another call of the writers (its marker file records the
    parameters) with other parameters raises instead of being reused: a 4-image quick run's folder
    silently became the full demo's training set."""
    root = Path(root).expanduser()
    if root.is_dir() and not any(root.iterdir()):  # an empty folder (made beforehand): written into, not reused
        root.rmdir()
    if root.exists():
        marker = root / MARKER
        if marker.is_file():
            try:
                stored = json.loads(marker.read_text())
            except (OSError, ValueError):
                stored = None
            want = json.loads(json.dumps(params))
            if isinstance(stored, dict) and stored != want:
                diff = {k: (stored.get(k), want.get(k)) for k in sorted(set(stored) | set(want))
                        if stored.get(k) != want.get(k)}
                raise DataError(
                    f"{root} holds a synthetic dataset written with other settings (setting: (in the folder, "
                    f"asked for)): {diff}. Fix: delete {root} to write it anew, or give another root"
                )
        return root
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        (tmp / MARKER).write_text(json.dumps(params, indent=1))
        try:
            os.replace(tmp, root)
        except OSError:
            if not root.exists():  # a concurrent writer finishing first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _shape_polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == 0:  # circle
        n, radii = 48, [r] * 48
    elif kind == 1:  # square
        n, radii = 4, [r] * 4
    elif kind == 2:  # triangle
        n, radii = 3, [r] * 3
    else:  # five-pointed star
        n, radii = 10, [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    return [(cx + radii[i] * math.cos(angle + 2 * math.pi * i / n),
             cy + radii[i] * math.sin(angle + 2 * math.pi * i / n)) for i in range(n)]


def _scene(rng: np.random.Generator, h: int, w: int, num_classes: int, max_objects: int):
    """One image (H, W, 3) uint8, its label map (0 = background, k = class k) and object list."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 190, 3)
    slope = rng.uniform(-0.3, 0.3, (2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        kind = int(rng.integers(0, num_classes))
        r = float(rng.uniform(0.08, 0.25) * min(h, w))
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        poly = _shape_polygon(kind % len(SHAPE_CLASSES), cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        draw.polygon(poly, fill=kind + 1)  # later shapes occlude earlier ones
        objects.append((kind, poly))
    label = np.asarray(canvas).copy()
    for k in range(num_classes):
        colour = np.array(_SHAPE_RGB[k % len(_SHAPE_RGB)], np.float32) + rng.uniform(-35, 35, 3)
        img[label == k + 1] = colour
    img = img + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label, objects


def _check_size_range(size_range: Sequence[int]) -> None:
    if len(size_range) != 2 or not 1 <= size_range[0] <= size_range[1]:
        raise ValueError(f"size_range={tuple(size_range)}: expected (min, max) image sides with 1 <= min <= max. "
                         "Fix: e.g. size_range=(128, 256)")


def write_ade20k_like(
    root: str | Path, num_train: int = 64, num_val: int = 16, num_classes: int = 4,
    size_range: tuple[int, int] = (128, 256), seed: int = 0, quirks: bool = True,
) -> Path:
    """Write ``root/ADEChallengeData2016/{images,annotations}/{training,validation}``.

    Labels are single-channel PNGs: 0 = background ("other" in ADE20K), k = shape class k
    (circle, square, triangle, star, ...). Read with ``reduce_zero_label=False`` and
    ``num_classes + 1`` classes to learn the background, or ADE20K-style with
    ``reduce_zero_label=True``. With ``quirks``, one training image is grayscale and a macOS
    ``._`` junk file sits among the images, as in real archives.

    Args:
        root: output folder (the dataset goes in ``root/ADEChallengeData2016``).
        num_train, num_val: image counts.
        num_classes: shape classes (background not counted), at most 250.
        size_range: min and max image side in pixels (sizes vary per image).
        seed: random seed (the output is deterministic).
        quirks: add the grayscale image and the junk file.

    Returns:
        Path to ``root/ADEChallengeData2016``.
    """
    if not 1 <= num_classes <= 250:
        raise ValueError(f"num_classes={num_classes}: expected 1..250 (label values up to 250; 255 is the ignore "
                         "label). Fix: `num_classes`")
    _check_size_range(size_range)
    params = dict(kind="ade20k", num_train=num_train, num_val=num_val, num_classes=num_classes,
                  size_range=list(size_range), seed=seed, quirks=quirks)

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for split, n, prefix in (("training", num_train, "train"), ("validation", num_val, "val")):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "annotations" / split).mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
                img, label, _ = _scene(rng, h, w, num_classes, max_objects=4)
                name = f"ADE_{prefix}_{i:08d}"
                pil = Image.fromarray(img)
                if quirks and split == "training" and i == 0:
                    pil = pil.convert("L")
                pil.save(tmp / "images" / split / f"{name}.jpg", quality=92)
                Image.fromarray(label, mode="L").save(tmp / "annotations" / split / f"{name}.png")
        if quirks:
            (tmp / "images" / "training" / "._ADE_train_00000000.jpg").write_bytes(b"\x00\x05\x16\x07junk")
        names = ["background", *[SHAPE_CLASSES[k % 4] + ("" if k < 4 else f"_{k}") for k in range(num_classes)]]
        (tmp / "class_names.txt").write_text("\n".join(names) + "\n")

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return _atomic_write(root / "ADEChallengeData2016", params, fill)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major runs, starting with a run of zeros)."""
    flat = np.asfortranarray(mask).reshape(-1, order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def write_coco_like(
    root: str | Path, num_train: int = 12, num_val: int = 4, size_range: tuple[int, int] = (96, 160),
    seed: int = 0,
) -> Path:
    """Write ``root/{train2017,val2017}/*.jpg`` and ``root/annotations/instances_{train,val}2017.json``.

    Categories have non-contiguous ids (1 circle, 3 square, 7 triangle, 9 star) so the label
    mapping is exercised. Objects are polygons, except per split one compressed-RLE object
    and one crowd region (uncompressed RLE, ``iscrowd=1``); the training file also holds a
    degenerate annotation (zero-width box) and each split one image without annotations.

    Args:
        root: output folder.
        num_train, num_val: image counts (at least 2 each).
        size_range: min/max image side.
        seed: random seed.

    Returns:
        ``root``.
    """
    from pycocotools import mask as mask_utils

    cat_ids = (1, 3, 7, 9)
    _check_size_range(size_range)
    params = dict(kind="coco", num_train=num_train, num_val=num_val, size_range=list(size_range), seed=seed)

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        (tmp / "annotations").mkdir()
        ann_id = 1
        for split, n, base_id in (("train2017", num_train, 1000), ("val2017", num_val, 5000)):
            (tmp / split).mkdir()
            images, anns = [], []
            for i in range(n):
                h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
                empty = i == n - 1
                img, _, objects = _scene(rng, h, w, len(cat_ids), max_objects=3)
                if empty:
                    img, objects = np.full((h, w, 3), 128, np.uint8), []
                image_id = base_id + i
                fname = f"{image_id:012d}.jpg"
                Image.fromarray(img).save(tmp / split / fname, quality=92)
                images.append({"id": image_id, "file_name": fname, "height": h, "width": w})
                for j, (kind, poly) in enumerate(objects):
                    flat = [round(float(v), 2) for xy in poly for v in xy]
                    rle = mask_utils.frPyObjects([flat], h, w)[0]
                    with warnings.catch_warnings():  # pycocotools + numpy 2 "copy keyword" notice
                        warnings.simplefilter("ignore", DeprecationWarning)
                        m = mask_utils.decode(rle)
                    if not m.any():
                        continue
                    if i == 1 and j == 0:  # one object stored as compressed RLE
                        seg: Any = {"counts": rle["counts"].decode("ascii"), "size": [h, w]}
                    else:
                        seg = [flat]
                    x, y, bw, bh = mask_utils.toBbox(rle).tolist()
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": cat_ids[kind],
                                 "segmentation": seg, "area": float(m.sum()), "bbox": [x, y, bw, bh],
                                 "iscrowd": 0})
                    ann_id += 1
                if i == 0:  # a crowd region in the top-left corner, uncompressed RLE
                    m = np.zeros((h, w), np.uint8)
                    m[: h // 5, : w // 4] = 1
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": cat_ids[0],
                                 "segmentation": _uncompressed_rle(m), "area": float(m.sum()),
                                 "bbox": [0.0, 0.0, float(w // 4), float(h // 5)], "iscrowd": 1})
                    ann_id += 1
                if i == 0 and split == "train2017":  # degenerate: zero-width box, a polygon of collinear points
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": cat_ids[1],
                                 "segmentation": [[10.0, 10.0, 10.0, 20.0, 10.0, 30.0]], "area": 0.0,
                                 "bbox": [10.0, 10.0, 0.0, 20.0], "iscrowd": 0})
                    ann_id += 1
            doc = {
                "info": {"description": "mamba-dense synthetic shapes", "version": "1.0"},
                "licenses": [],
                "images": images,
                "annotations": anns,
                "categories": [{"id": c, "name": SHAPE_CLASSES[k], "supercategory": "shape"}
                               for k, c in enumerate(cat_ids)],
            }
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))

    return _atomic_write(Path(root), params, fill)


def _blob(shape: Sequence[int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0


def write_msd_like(
    root: str | Path, num_cases: int = 8, num_test: int = 2, shape: tuple[int, int, int] = (48, 48, 48),
    num_foreground: int = 2, modalities: Sequence[str] = ("CT",), spacing: tuple[float, float, float] = (1.0, 1.0, 1.5),
    seed: int = 0, quirks: bool = True,
) -> Path:
    """Write an MSD task: ``root/dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``.

    Each case is an ellipsoidal "body" holding a blob per foreground class (class 2 inside
    class 1, like organ + tumour). CT images are int16 Hounsfield-like values; any other
    modality gives float32 MR-like intensities with a zero background. Several modalities
    give 4D images with the modalities last, as in MSD. The affine is LPS-oriented with
    ``spacing`` so readers must reorient. With ``quirks``, macOS ``._`` junk files sit in
    imagesTr/labelsTr as in the official archives (readers must follow dataset.json).

    Args:
        root: the task folder to create.
        num_cases, num_test: labelled training cases and unlabelled test cases.
        shape: volume shape (x, y, z) in file order.
        num_foreground: foreground classes (1..3).
        modalities: one name per channel, e.g. ("CT",) or ("FLAIR", "T1w").
        spacing: voxel size in mm along x, y, z.
        seed: random seed.
        quirks: add the junk files.

    Returns:
        ``root``.
    """
    import nibabel as nib

    if not 1 <= num_foreground <= 3:
        raise ValueError(f"num_foreground={num_foreground}: expected 1..3 (organ, lesion, vessel). "
                         "Fix: `num_foreground`")
    params = dict(kind="msd", num_cases=num_cases, num_test=num_test, shape=list(shape),
                  num_foreground=num_foreground, modalities=list(modalities), spacing=list(spacing), seed=seed)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS: x and y flipped vs RAS
    affine[:3, 3] = [shape[0] * spacing[0] / 2, shape[1] * spacing[1] / 2, -shape[2] * spacing[2] / 2]
    shape = tuple(int(s) for s in shape)
    s = np.array(shape, dtype=np.float64)

    def case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        body = _blob(shape, s / 2 + rng.uniform(-2, 2, 3), s * rng.uniform(0.38, 0.45, 3))
        label = np.zeros(shape, np.uint8)
        centre = s / 2 + rng.uniform(-0.12, 0.12, 3) * s
        radii = s * rng.uniform(0.14, 0.22, 3)
        for k in range(1, num_foreground + 1):
            label[_blob(shape, centre, radii) & body] = k
            centre = centre + rng.uniform(-0.3, 0.3, 3) * radii
            radii = radii * rng.uniform(0.35, 0.5)
        channels = []
        for c, mod in enumerate(modalities):
            if mod.upper() == "CT":
                vol = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape)
                for k in range(1, num_foreground + 1):
                    vol[label == k] = 40.0 + 60.0 * k + rng.normal(0, 15, int((label == k).sum()))
                channels.append(np.clip(vol, -1024, 3000).astype(np.int16))
            else:
                vol = np.where(body, 300.0 + 50 * c, 0.0) + body * rng.normal(0, 30, shape)
                for k in range(1, num_foreground + 1):
                    vol[label == k] += (150.0 if (k + c) % 2 else -120.0)
                channels.append(np.clip(vol, 0, None).astype(np.float32))
        image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1).astype(np.float32)
        return image, label

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        training, test = [], []
        for i in range(num_cases + num_test):
            image, label = case(rng)
            name = f"synth_{i:03d}.nii.gz"
            if i < num_cases:
                nib.save(nib.Nifti1Image(image, affine), tmp / "imagesTr" / name)
                nib.save(nib.Nifti1Image(label, affine), tmp / "labelsTr" / name)
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            else:
                nib.save(nib.Nifti1Image(image, affine), tmp / "imagesTs" / name)
                test.append(f"./imagesTs/{name}")
        if quirks:
            for sub in ("imagesTr", "labelsTr"):
                (tmp / sub / "._synth_000.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
        names = ["organ", "lesion", "vessel"]
        labels = {"0": "background", **{str(k): names[k - 1] for k in range(1, num_foreground + 1)}}
        doc = {
            "name": "Synthetic", "description": "mamba-dense synthetic volumes",
            "tensorImageSize": "4D" if len(modalities) > 1 else "3D",
            "reference": "synthetic", "licence": "CC0", "release": "1.0",
            "modality": {str(c): m for c, m in enumerate(modalities)}, "labels": labels,
            "numTraining": num_cases, "numTest": num_test, "training": training, "test": test,
        }
        (tmp / "dataset.json").write_text(json.dumps(doc, indent=1))

    root = Path(root).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    return _atomic_write(root, params, fill)
