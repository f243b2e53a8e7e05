"""COCO instance segmentation for torchvision's Mask R-CNN.

Layout (``root``)::

    train2017/*.jpg  val2017/*.jpg  annotations/instances_{train,val}2017.json

Batches are ``(images, targets)``: a list of (3, H, W) float32 images in [0, 1], NOT normalized
(torchvision's ``GeneralizedRCNNTransform`` normalizes, and resizes, inside the model), and a
list of target dicts: ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,) int64 in 1..C (0 is the
background), ``masks`` (N, H, W) uint8, ``image_id`` () int64, ``iscrowd`` (N,) int64,
``area`` (N,) float32, ``orig_size`` / ``size`` (2,) int64 (H, W) on disk / as returned.

Resizing happens once: by default (``resize=False``) the model resizes, built with
``**datamodule.maskrcnn_transform_kwargs()`` (multi-scale ``min_size`` for training); with
``resize=True`` the datamodule resizes and those kwargs switch the model's training resize off
(at test time the model's resize is then the identity, same scale and cap).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from ._common import (
    IMAGENET_MEAN, IMAGENET_STD, CorruptFileError, DataError, SkipsCorrupt, WorkerSeeded, check_choice,
    check_number, check_sizes, default_cache_dir, is_file, make_loader, read_json, read_rgb, report_skipped,
)
from .synthetic import write_coco_like
from .transforms import ResizeShortestEdge

__all__ = ["COCOInstanceDataModule", "CocoInstances", "SyntheticCOCODataModule", "collate_detection", "load_coco"]

_REQUIRED = {"images": ("id", "file_name", "height", "width"),
             "annotations": ("id", "image_id", "category_id", "bbox"),
             "categories": ("id", "name")}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63


def _is_real(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


# field -> (check, what it must be); checked for every entry so that a wrong type raises here,
# naming the entry, instead of a TypeError deep inside pycocotools or the dataset
_FIELD_CHECKS = {
    "images": {"id": (_is_int, "an integer id"), "file_name": (lambda v: isinstance(v, str) and v, "a file name"),
               "height": (lambda v: _is_int(v) and v > 0, "a positive integer"),
               "width": (lambda v: _is_int(v) and v > 0, "a positive integer")},
    "annotations": {"id": (_is_int, "an integer id"), "image_id": (_is_int, "an integer id"),
                    "category_id": (_is_int, "an integer id"),
                    "bbox": (lambda v: isinstance(v, list) and len(v) == 4 and all(_is_real(x) for x in v),
                             "4 finite numbers [x, y, width, height]"),
                    "iscrowd": (lambda v: isinstance(v, (int, float)) and v in (0, 1), "0 or 1"),
                    "area": (_is_real, "a finite number")},
    "categories": {"id": (_is_int, "an integer id"), "name": (lambda v: isinstance(v, str), "a string")},
}


def load_coco(ann_file: Path, on_missing: str = "error") -> COCO:
    """Parse and check a COCO instances file; returns an indexed ``pycocotools`` COCO object.

    A file without an ``annotations`` list (COCO's ``image_info_test-dev2017.json``) is read as
    images to predict (``coco.image_info_only``); training or evaluating on it raises.
    Annotations whose ``image_id`` or ``category_id`` is not listed, or that have no mask (no
    ``segmentation``, an empty one, or no polygon of 3 or more points), raise
    (``on_missing="error"``) or are dropped with a warning (``"skip"``): COCOeval could not score
    them. Polygon parts under 3 points or with an odd number of coordinates are dropped (as
    detectron2 and mmdet do) and counted. The dropped ids are in ``coco.skipped``. Missing
    ``area`` fields are filled with the mask's area (as pycocotools' ``loadRes``).
    """
    check_choice("on_missing", on_missing, ("error", "skip"))
    doc = read_json(ann_file, "COCO annotation file")
    if not isinstance(doc, dict):
        raise DataError(ann_file, "top level", "not a JSON object", "use a COCO instances_*.json file")
    image_info_only = "annotations" not in doc and isinstance(doc.get("images"), list)
    if image_info_only:  # e.g. image_info_test-dev2017.json: images to predict, nothing to evaluate
        doc["annotations"] = []
    for key, fields in _REQUIRED.items():
        if not isinstance(doc.get(key), list):
            raise DataError(ann_file, key, "missing or not a list",
                            "use an instances_*.json file (captions/keypoints-only files lack it)")
        for i, entry in enumerate(doc[key]):
            if not isinstance(entry, dict):
                raise DataError(ann_file, f"{key}[{i}]", f"expected an object, got {type(entry).__name__}",
                                "repair the entry or regenerate the annotation file")
            missing = [f for f in fields if f not in entry]
            if missing:
                raise DataError(ann_file, f"{key}[{i}] (id={entry.get('id')})", f"missing field(s) {missing}",
                                "repair the entry or regenerate the annotation file")
            for f, (ok, what) in _FIELD_CHECKS[key].items():
                if f in entry and not ok(entry[f]):
                    raise DataError(ann_file, f"{key}[{i}].{f}", f"expected {what}, got {str(entry[f])[:60]!r}",
                                    "repair the entry or regenerate the annotation file")
        if key != "annotations" and len({e["id"] for e in doc[key]}) != len(doc[key]):
            raise DataError(ann_file, f"{key}[].id", "duplicate ids", f"give every entry of {key} its own id")
    images = {im["id"]: im for im in doc["images"]}
    image_ids = images.keys()
    cat_ids = {c["id"] for c in doc["categories"]}
    skipped: dict[str, list[Any]] = {"annotation_unknown_image_id": [], "annotation_unknown_category_id": [],
                                     "annotation_without_mask": [], "polygon_part_invalid": []}
    kept = []
    for i, a in enumerate(doc["annotations"]):
        if a["image_id"] not in image_ids or a["category_id"] not in cat_ids:
            bad = "image_id" if a["image_id"] not in image_ids else "category_id"
            if on_missing == "error":
                raise DataError(ann_file, f"annotations[{i}] (id={a['id']}).{bad}", f"unknown {bad} {a[bad]}",
                                "remove the annotation, add the missing image/category, or pass on_missing='skip'")
            skipped[f"annotation_unknown_{bad}"].append(a["id"])
            continue
        problem = _mask_problem(a, skipped["polygon_part_invalid"])
        if problem:
            # COCOeval rasterizes every ground truth: an annotation without a mask would crash it at
            # the end of the first validation epoch, or (a line-like "polygon") be read as a box
            if on_missing == "error":
                raise DataError(ann_file, f"annotations[{i}] (id={a['id']}).segmentation", problem,
                                "give it a polygon [[x1, y1, x2, y2, x3, y3, ...]] or an RLE, remove the annotation, "
                                "or pass on_missing='skip' to drop such annotations (Mask R-CNN needs a mask for "
                                "every instance)")
            skipped["annotation_without_mask"].append(a["id"])
            continue
        kept.append(a)
        a.setdefault("iscrowd", 0)
        if "area" not in a:  # COCOeval's small/medium/large ranges use the mask area, as pycocotools' loadRes
            a["area"] = _mask_area(a, images[a["image_id"]], ann_file, f"annotations[{i}] (id={a['id']})")
    doc["annotations"] = kept
    ann_ids = [a["id"] for a in doc["annotations"]]
    if 0 in ann_ids or len(set(ann_ids)) != len(ann_ids):
        # NOTE: COCOeval uses 0 as "unmatched", so a ground truth with id 0 can never be matched,
        # and duplicate ids corrupt the index. Renumber in memory (the file is left untouched);
        # messages keep naming an annotation by its id in the file (``file_id``).
        warnings.warn(f"{ann_file}: annotations[].id contains 0 or duplicates; renumbered 1..N in memory "
                      "so COCOeval can match them (fix the file to silence this)", stacklevel=2)
        for k, a in enumerate(doc["annotations"], start=1):
            a["_file_id"], a["id"] = a["id"], k
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    coco.skipped = skipped  # type: ignore[attr-defined]
    coco.image_info_only = image_info_only  # type: ignore[attr-defined]
    return coco


def file_id(ann: dict[str, Any]) -> Any:
    """The annotation's id in its file (``load_coco`` may renumber ids in memory)."""
    return ann.get("_file_id", ann["id"])


def _valid_polygon(p: Any) -> bool:
    return isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0


def _mask_problem(ann: dict[str, Any], invalid_parts: list[Any]) -> str | None:
    """Why ``ann`` has no usable mask (None if it has one). Polygon parts with fewer than 3
    points or an odd number of coordinates are dropped in memory (detectron2 and mmdet drop them
    too; pycocotools would read a 4-number part as a box), their annotation's id is appended to
    ``invalid_parts``. Other malformed segmentations are left to ``_decode``, which names them."""
    if "segmentation" not in ann:
        return "missing"
    seg = ann["segmentation"]
    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        return f"empty ({seg!r})"
    if not isinstance(seg, list):
        return None
    if all(_is_real(v) for v in seg):
        return "a flat list of numbers; COCO polygons are a list of lists [[x1, y1, x2, y2, ...], ...]"
    polys = [p for p in seg if _valid_polygon(p)]
    if len(polys) < len(seg):
        invalid_parts.append(ann["id"])
        ann["segmentation"] = polys
    if not polys:
        return "no polygon with 3 or more (x, y) points (a polygon is a list of an even number >= 6 of coordinates)"
    return None


def _mask_area(ann: dict[str, Any], image: dict[str, Any], ann_file: Path, where: str) -> float:
    """Pixel area of the annotation's mask (its box area for an unsupported segmentation, which
    ``_decode`` reports when the image is loaded)."""
    seg, h, w = ann["segmentation"], image["height"], image["width"]
    if isinstance(seg, list):
        _check_polygons(seg, h, w, ann_file, where + ".segmentation")
        return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))))
    if isinstance(seg, dict) and seg.get("size") == [h, w] and "counts" in seg:
        _check_rle_counts(seg["counts"], h, w, ann_file, where + ".segmentation.counts")
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        return float(mask_utils.area(rle))
    return float(ann["bbox"][2] * ann["bbox"][3])


def _clip_box(bbox: Sequence[float], image: dict[str, Any]) -> tuple[float, float, float, float]:
    """COCO xywh box clipped to its image, as xywh (width / height <= 0 when nothing is left)."""
    x, y, bw, bh = (float(v) for v in bbox)
    x0, y0 = max(0.0, x), max(0.0, y)
    return x0, y0, min(float(image["width"]), x + bw) - x0, min(float(image["height"]), y + bh) - y0


def _check_polygons(polys: list[list[Any]], h: int, w: int, ann_file: Path, where: str) -> None:
    """Polygon coordinates must be finite numbers near the image: pycocotools rasterizes with C
    ints and no bounds checks (a coordinate of 1e9 crashes the process)."""
    for p in polys:
        if not all(_is_real(v) for v in p):
            bad = next(v for v in p if not _is_real(v))
            raise DataError(ann_file, where, f"polygon coordinate {str(bad)[:30]!r} is not a finite number",
                            "repair the polygon (x1, y1, x2, y2, ... in pixels)")
        xs, ys = p[0::2], p[1::2]
        if min(xs) < -w or max(xs) > 2 * w or min(ys) < -h or max(ys) > 2 * h:
            raise DataError(ann_file, where, f"polygon reaches x {min(xs):.4g}..{max(xs):.4g}, y {min(ys):.4g}.."
                            f"{max(ys):.4g}, far outside the {w}x{h} (WxH) image",
                            "check image_id and the polygon (coordinates are pixels of this image)")


def _check_rle_counts(counts: Any, h: int, w: int, ann_file: Path, where: str) -> None:
    """RLE run lengths must be non-negative and cover exactly h * w pixels: pycocotools decodes
    without bounds checks (longer runs write past the mask)."""
    if isinstance(counts, bytes):  # pycocotools' own compressed RLE (e.g. a ground truth COCOeval rewrote)
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            raise DataError(ann_file, where, "uncompressed RLE counts must be non-negative integers",
                            "regenerate the RLE (pycocotools.mask.encode)")
        runs = counts
    elif isinstance(counts, str):
        runs = _rle_string_runs(counts)
        if runs is None:
            raise DataError(ann_file, where, f"malformed compressed RLE string {counts[:20]!r}",
                            "regenerate the RLE (pycocotools.mask.encode)")
    else:
        raise DataError(ann_file, where, f"expected a list of run lengths or a compressed string, got "
                        f"{type(counts).__name__}", "regenerate the RLE (pycocotools.mask.encode)")
    if sum(runs) != h * w:
        raise DataError(ann_file, where, f"runs cover {sum(runs)} pixels but the image has {h}x{w} = {h * w}",
                        "regenerate the RLE at the image resolution")


def _rle_string_runs(s: str) -> list[int] | None:
    """Run lengths of COCO's compressed RLE string (pycocotools ``rleFrString``), None if malformed."""
    runs: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                return None
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return runs


def _decode(ann: dict[str, Any], h: int, w: int, ann_file: Path) -> np.ndarray | None:
    """(H, W) uint8 mask of a polygon / RLE annotation; None when no valid polygon remains."""
    seg = ann.get("segmentation")
    where = f"annotations[id={file_id(ann)}].segmentation"
    if seg is None or (isinstance(seg, (list, dict)) and not seg):  # empty: no mask, the annotation is dropped
        return None
    if isinstance(seg, list):
        # NOTE: pycocotools reads a 4-number "polygon" as a box; keep real polygons only
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return None
        _check_polygons(polys, h, w, ann_file, where)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if not isinstance(seg["size"], list) or seg["size"] != [h, w]:
            raise DataError(ann_file, where + ".size", f"{str(seg['size'])[:40]} but the image is {[h, w]} (H, W)",
                            "regenerate the RLE at the image resolution")
        _check_rle_counts(seg["counts"], h, w, ann_file, where + ".counts")
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
    else:
        raise DataError(ann_file, where, f"unsupported segmentation {type(seg).__name__}",
                        "use polygons (list of lists) or RLE ({'counts', 'size'})")
    with warnings.catch_warnings():  # pycocotools + numpy 2: harmless "copy keyword" DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


class CocoInstances(SkipsCorrupt, WorkerSeeded, Dataset):
    """Images and instance targets of one COCO annotation file.

    Args:
        coco: parsed annotations (``load_coco``).
        ann_file: its path (for error messages).
        image_dir: folder of the images named in ``file_name``.
        cat_id_to_label: COCO category id -> contiguous label 1..C.
        train: drop crowd regions from targets and skip images without usable annotations.
        transform: albumentations pipeline (boxes as ``pascal_voc`` with an ``ann_index`` field).
        min_box_size: boxes thinner than this (pixels) are dropped, before and after transforms.
        on_missing: images listed in the file but absent from ``image_dir``: "error" lists them and
            raises, "skip" drops them with a warning (``skipped["image_file_missing"]``).
        on_corrupt: undecodable images: "error" raises naming the file, "skip" warns and serves the
            next readable image (counted in ``corrupt``, per process).

    Attributes:
        skipped: reason -> ids (as in the file) / paths dropped when the dataset was built: from
            ``load_coco`` (unknown image/category references, annotations without a mask, polygon
            parts dropped), missing image files, and annotations never used as targets
            (``annotation_degenerate_box``: thinner than ``min_box_size``, routine in COCO;
            ``annotation_box_outside_image``: nothing left after clipping to the image).
    """

    def __init__(self, coco: COCO, ann_file: Path, image_dir: Path, cat_id_to_label: dict[int, int],
                 train: bool, transform: A.Compose, min_box_size: float = 1.0, on_missing: str = "error",
                 on_corrupt: str = "error") -> None:
        self.coco, self.ann_file, self.image_dir = coco, ann_file, image_dir
        self.cat_id_to_label, self.train, self.transform = cat_id_to_label, train, transform
        self.min_box_size = check_number("min_box_size", min_box_size, 0, lo_open=True, example="1.0")
        self.on_missing = check_choice("on_missing", on_missing, ("error", "skip"))
        self.on_corrupt = check_choice("on_corrupt", on_corrupt, ("error", "skip"))
        self.corrupt = []
        self.skipped: dict[str, list[Any]] = {k: list(v) for k, v in getattr(coco, "skipped", {}).items()}
        anns = coco.dataset["annotations"]
        self.skipped["annotation_degenerate_box"] = [
            file_id(a) for a in anns if min(a["bbox"][2], a["bbox"][3]) < min_box_size]
        # a box that lies (almost) outside its image is cut to nothing in _get_item
        self.skipped["annotation_box_outside_image"] = [
            file_id(a) for a in anns if min(a["bbox"][2], a["bbox"][3]) >= min_box_size
            and min(_clip_box(a["bbox"], coco.imgs[a["image_id"]])[2:]) < min_box_size]
        ids = sorted(coco.imgs)
        absent = [i for i in ids if not is_file(image_dir / coco.imgs[i]["file_name"])]
        if absent:
            paths = [str(image_dir / coco.imgs[i]["file_name"]) for i in absent]
            if self.on_missing == "error":
                raise FileNotFoundError(
                    f"{paths[0]}: listed in {ann_file} images[id={absent[0]}].file_name but not found "
                    f"({len(absent)} image(s) missing in all: {paths[:3]}). Fix: check the image folder argument "
                    "(train_images/val_images), restore the files, or pass on_missing='skip'")
            self.skipped["image_file_missing"] = paths
            ids = sorted(set(ids) - set(absent))
        if train:
            ids = [i for i in ids if any(self._usable(a) for a in coco.imgToAnns.get(i, []))]
            if not ids:
                counts = {k: len(v) for k, v in self.skipped.items() if v}
                raise DataError(ann_file, "annotations", f"no training image keeps an instance (of {len(coco.imgs)} "
                                f"images and {len(anns)} annotations; dropped: {counts or 'none'}; crowd regions "
                                f"and boxes under min_box_size={min_box_size} px are not trained on)",
                                "check that the file has masks and boxes for the images in image_dir")
        self.ids = ids

    def check_files(self) -> list[str]:
        """Decode every image now; corrupt ones are dropped (``on_corrupt="skip"``, counted in
        ``skipped["corrupt"]``) or raise. Returns the corrupt paths."""
        bad, good = [], []
        for i in self.ids:
            try:
                read_rgb(self.image_dir / self.coco.imgs[i]["file_name"])
                good.append(i)
            except CorruptFileError as e:
                if self.on_corrupt != "skip":
                    raise
                bad.append(e.path)
        self.ids, self.skipped["corrupt"] = good, bad
        return bad

    def _usable(self, ann: dict[str, Any]) -> bool:
        if (self.train and ann.get("iscrowd", 0)) or not ann.get("segmentation"):
            return False
        _, _, w, h = _clip_box(ann["bbox"], self.coco.imgs[ann["image_id"]])
        return w >= self.min_box_size and h >= self.min_box_size

    def _seeded_transforms(self) -> list[Any]:
        return [self.transform]

    def __len__(self) -> int:
        return len(self.ids)

    def _get_item(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.rng(index)
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not is_file(path):
            raise FileNotFoundError(f"{path}: listed in {self.ann_file} images[id={image_id}].file_name but not "
                                    "found. Fix: check the image folder argument (train_images/val_images) or "
                                    "restore the file")
        image = read_rgb(path)
        h, w = image.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise DataError(self.ann_file, f"images[id={image_id}].height/width",
                            f"{info['height']}x{info['width']} but {info['file_name']} is {h}x{w} (HxW)",
                            "fix the entry or restore the original image (EXIF-rotated copies do not match)")
        boxes, labels, crowd, masks = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if not self._usable(ann):
                continue
            m = _decode(ann, h, w, self.ann_file)
            if m is None:
                continue
            cx, cy, cw, ch = _clip_box(ann["bbox"], info)
            if cw < self.min_box_size or ch < self.min_box_size:
                continue
            box = [cx, cy, cx + cw, cy + ch]
            boxes.append(box)
            labels.append(self.cat_id_to_label[ann["category_id"]])
            crowd.append(int(ann.get("iscrowd", 0)))
            masks.append(m)
        data: dict[str, Any] = {"image": image, "bboxes": np.array(boxes, np.float32).reshape(-1, 4),
                                "ann_index": list(range(len(boxes)))}
        if masks:  # albumentations cannot stack an empty mask list
            data["masks"] = np.stack(masks)
        out = self.transform(**data)
        keep = [int(i) for i in out["ann_index"]]  # albumentations may drop boxes, never their masks
        new_h, new_w = out["image"].shape[:2]
        out_masks = out["masks"][keep] if masks else np.zeros((0, new_h, new_w), np.uint8)
        out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        target = {
            "boxes": torch.from_numpy(out_boxes),
            "labels": torch.tensor([labels[i] for i in keep], dtype=torch.int64),
            "masks": torch.from_numpy(np.ascontiguousarray(out_masks, dtype=np.uint8)),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "iscrowd": torch.tensor([crowd[i] for i in keep], dtype=torch.int64),
            "area": torch.from_numpy(out_masks.sum(axis=(1, 2)).astype(np.float32)),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([new_h, new_w], dtype=torch.int64),
        }
        img = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))).float().div_(255.0)
        return img, target


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list, list]:
    """Variable-size images stay a list: ``(list[image], list[target])`` as torchvision expects."""
    return [b[0] for b in batch], [b[1] for b in batch]


class COCOInstanceDataModule(L.LightningDataModule):
    """COCO instances (or any file in that format) for Mask R-CNN.

    Annotation files are parsed with ``json`` and indexed by pycocotools; polygons and RLE
    (crowd regions) decode to masks. Training targets drop crowd regions, degenerate boxes and
    images left without annotations; validation keeps every image and flags crowd regions with
    ``iscrowd=1`` (drop them before computing a loss; COCOeval reads ``coco_gt(split)``).
    Category ids map to contiguous labels 1..C (``cat_id_to_label``) and back
    (``label_to_cat_id``, used by ``to_coco_results``).

    Augmentation: horizontal flip; with ``resize=True`` also detectron2-style multi-scale
    short-side resize (``train_scales``, capped at ``max_size``) in training and ``test_scale``
    at evaluation; boxes and masks stay aligned when albumentations drops a box.

    Args:
        root: dataset folder; annotation/image paths below are relative to it (or absolute).
        train_ann, val_ann, test_ann: annotation files (test defaults to val).
        train_images, val_images, test_images: image folders (test defaults to val's).
        batch_size, val_batch_size, num_workers: loader settings.
        resize: resize in the datamodule (else leave it to the model, see module doc).
        train_scales: short-side sizes for multi-scale training (1x/3x recipes: 640..800).
        test_scale: evaluation short side.
        max_size: long-side cap.
        hflip_prob: horizontal flip probability in training.
        min_box_size: boxes thinner than this many pixels are dropped.
        on_missing: images listed in an annotation file but absent on disk, annotations naming
            an unknown image/category, and annotations without a mask: "error" (default) names
            them and raises, "skip" drops them with a warning. Counts: ``skipped`` after ``setup``.
        on_corrupt: undecodable images: "error" (default) raises naming the file, "skip" warns
            and serves the next readable image (counted per worker process).
        check_files: decode every image at ``setup`` (corrupt ones dropped and counted with
            ``on_corrupt="skip"``); one full pass over the images.
        pin_memory, persistent_workers, prefetch_factor: DataLoader settings (None: pin when
            CUDA is available, persistent whenever ``num_workers > 0``, PyTorch's prefetch).

    Attributes:
        num_classes: number of categories C (Mask R-CNN needs ``num_classes + 1`` with background).
        class_names: C names in label order (label k -> ``class_names[k - 1]``).
        mean, std: ImageNet statistics the model's transform should normalize with.

    Example:
        >>> dm = COCOInstanceDataModule("data/coco", batch_size=2)
        >>> model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        ...     num_classes=dm.num_classes + 1, **dm.maskrcnn_transform_kwargs())  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str,
        train_ann: str = "annotations/instances_train2017.json",
        val_ann: str = "annotations/instances_val2017.json",
        test_ann: str | None = None,
        train_images: str = "train2017",
        val_images: str = "val2017",
        test_images: str | None = None,
        batch_size: int = 2,
        val_batch_size: int = 2,
        num_workers: int = 4,
        resize: bool = False,
        train_scales: tuple[int, ...] = (640, 672, 704, 736, 768, 800),
        test_scale: int = 800,
        max_size: int = 1333,
        hflip_prob: float = 0.5,
        min_box_size: float = 1.0,
        on_missing: str = "error",
        on_corrupt: str = "error",
        check_files: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("on_missing", on_missing, ("error", "skip"))
        check_choice("on_corrupt", on_corrupt, ("error", "skip"))
        # NOTE: not sent to the logger: Lightning merges the datamodule's and the task's logged
        # hyperparameters and stops the run when a name holds two values (the tasks' own patch_size /
        # size_divisor are the inference window / padding and may differ); the CLI's config.yaml keeps them
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.files = {"train": (train_ann, train_images), "val": (val_ann, val_images),
                      "test": (test_ann or val_ann, test_images or val_images)}
        self.batch_size = int(check_number("batch_size", batch_size, 1, example="2"))
        self.val_batch_size = int(check_number("val_batch_size", val_batch_size, 1, example="2"))
        self.num_workers = int(check_number("num_workers", num_workers, 0, example="4"))
        self.resize = resize
        self.train_scales = check_sizes("train_scales", train_scales, None, "(640, 672, 704, 736, 768, 800)")
        self.test_scale = check_sizes("test_scale", test_scale, 1, "800")[0]
        self.max_size = check_sizes("max_size", max_size, 1, "1333")[0]
        self.hflip_prob = check_number("hflip_prob", hflip_prob, 0, 1, example="0.5")
        # a box of width 0 cannot be trained on (albumentations and torchvision reject it)
        self.min_box_size = check_number("min_box_size", min_box_size, 0, lo_open=True, example="1.0")
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.on_missing, self.on_corrupt, self.check_files = on_missing, on_corrupt, check_files
        self.loader_kwargs = {"pin_memory": pin_memory, "persistent_workers": persistent_workers,
                              "prefetch_factor": prefetch_factor}
        self._gt: dict[str, COCO] = {}
        self._categories: list[dict[str, Any]] | None = None
        self._categories_file: Path | None = None
        self.datasets: dict[str, CocoInstances] = {}

    def _path(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.root / p

    def coco_gt(self, split: str = "val") -> COCO:
        """The pycocotools COCO object of ``split`` ("train", "val" or "test"), for COCOeval."""
        if split not in self._gt:
            ann_file = self._path(self.files[split][0])
            if not self.root.is_dir() and not ann_file.is_file():
                raise FileNotFoundError(
                    f"{self.root}: dataset folder not found. Expected layout: {self.root}/train2017/*.jpg, "
                    f"{self.root}/val2017/*.jpg, {self.root}/annotations/instances_{{train,val}}2017.json "
                    "(or the paths given as train_ann/val_ann/...). Fix: `root`")
            coco = load_coco(ann_file, self.on_missing)
            cats = sorted(coco.dataset["categories"], key=lambda c: c["id"])
            if self._categories is None:
                self._categories, self._categories_file = cats, ann_file
            elif [(c["id"], c["name"]) for c in cats] != [(c["id"], c["name"]) for c in self._categories]:
                raise DataError(ann_file, "categories", f"differ from the other split's categories (in "
                                f"{self._categories_file})",
                                "use annotation files of the same dataset (same category ids and names)")
            self._gt[split] = coco
        return self._gt[split]

    def _cats(self) -> list[dict[str, Any]]:
        if self._categories is None:
            for split in ("val", "train", "test"):
                if self._path(self.files[split][0]).is_file():
                    self.coco_gt(split)
                    break
            else:
                self.coco_gt("val")  # raises FileNotFoundError naming the file
        assert self._categories is not None
        return self._categories

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return {c["id"]: k + 1 for k, c in enumerate(self._cats())}

    @property
    def label_to_cat_id(self) -> dict[int, int]:
        return {k + 1: c["id"] for k, c in enumerate(self._cats())}

    @property
    def num_classes(self) -> int:
        return len(self._cats())

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self._cats()]

    def maskrcnn_transform_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for torchvision's ``MaskRCNN`` so images are resized exactly once."""
        kw: dict[str, Any] = {"max_size": self.max_size, "image_mean": list(self.mean), "image_std": list(self.std)}
        if self.resize:
            return {**kw, "min_size": self.test_scale, "_skip_resize": True}
        if self.train_scales[-1] != self.test_scale:
            warnings.warn(f"torchvision evaluates at min_size[-1]={self.train_scales[-1]}, not test_scale="
                          f"{self.test_scale}; put test_scale last in train_scales", stacklevel=2)
        return {**kw, "min_size": self.train_scales}

    def _transform(self, train: bool) -> A.Compose:
        steps: list[Any] = []
        if self.resize:
            steps.append(ResizeShortestEdge(self.train_scales if train else (self.test_scale,), self.max_size))
        if train and self.hflip_prob > 0:
            steps.append(A.HorizontalFlip(p=self.hflip_prob))
        bbox = A.BboxParams(format="pascal_voc", label_fields=["ann_index"],
                            min_width=self.min_box_size, min_height=self.min_box_size, clip=True)
        return A.Compose(steps or [A.NoOp()], bbox_params=bbox)

    def _get(self, split: str) -> CocoInstances:
        if split not in self.datasets:
            coco = self.coco_gt(split)
            ann_file, image_dir = self._path(self.files[split][0]), self._path(self.files[split][1])
            if not image_dir.is_dir():
                raise FileNotFoundError(
                    f"{image_dir}: image folder of split {split!r} not found (images named in {ann_file.name} "
                    f"file_name are read from it). Expected layout: {self.root}/{{train2017,val2017}}/*.jpg. "
                    f"Fix: `{split}_images` or `root`")
            ds = CocoInstances(
                coco, ann_file, image_dir, self.cat_id_to_label, train=split == "train",
                transform=self._transform(split == "train"), min_box_size=self.min_box_size,
                on_missing=self.on_missing, on_corrupt=self.on_corrupt,
            )
            if self.check_files:
                ds.check_files()
            report_skipped(f"COCO {split} split ({ann_file})", ds.skipped,
                           routine=("annotation_degenerate_box",))
            self.datasets[split] = ds
        return self.datasets[split]

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Items skipped so far per built split and reason (``corrupt`` adds files found at setup
        and those skipped in this process while loading)."""
        out = {}
        for split, ds in self.datasets.items():
            counts = {k: len(v) for k, v in ds.skipped.items()}
            counts["corrupt"] = len(set(ds.skipped.get("corrupt", [])) | set(ds.corrupt))
            out[split] = counts
        return out

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in wanted.get(stage or "", ["train", "val", "test"]):
            self._get(split)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self._get("train"), self.batch_size, True, self.num_workers, collate_detection,
                           **self.loader_kwargs)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self._get("val"), self.val_batch_size, False, self.num_workers, collate_detection,
                           **self.loader_kwargs)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self._get("test"), self.val_batch_size, False, self.num_workers, collate_detection,
                           **self.loader_kwargs)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def to_coco_results(self, outputs: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                        mask_threshold: float = 0.5) -> list[dict[str, Any]]:
        """Mask R-CNN outputs -> COCO result dicts (original image coordinates, COCO category ids),
        ready for ``coco_gt(split).loadRes``.

        Args:
            outputs: per image ``boxes`` (N, 4) xyxy, ``labels`` (N,), ``scores`` (N,) and optionally
                ``masks`` (N, 1, H, W) or (N, H, W) probabilities, in the coordinates of the input image.
            targets: the matching targets of the batch (for ``image_id``, ``size``, ``orig_size``).
            mask_threshold: binarization threshold of the mask probabilities.

        Returns:
            list of dicts with image_id, category_id, bbox (xywh), score and segmentation (RLE).
        """
        to_cat = self.label_to_cat_id
        results: list[dict[str, Any]] = []
        for out, tgt in zip(outputs, targets):
            (h, w), (oh, ow) = tgt["size"].tolist(), tgt["orig_size"].tolist()
            boxes = out["boxes"].detach().float().cpu() * torch.tensor([ow / w, oh / h, ow / w, oh / h])
            masks = out.get("masks")
            if masks is not None:
                masks = masks.detach().float().cpu()
                masks = masks[:, None] if masks.dim() == 3 else masks
                if masks.shape[-2:] != (oh, ow) and len(masks):
                    masks = F.interpolate(masks, size=(oh, ow), mode="bilinear", align_corners=False)
                masks = (masks[:, 0] > mask_threshold).numpy().astype(np.uint8)
            for i in range(len(boxes)):
                x0, y0, x1, y1 = boxes[i].tolist()
                res = {"image_id": int(tgt["image_id"]), "category_id": to_cat[int(out["labels"][i])],
                       "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(out["scores"][i])}
                if masks is not None:
                    rle = mask_utils.encode(np.asfortranarray(masks[i]))
                    rle["counts"] = rle["counts"].decode("ascii")
                    res["segmentation"] = rle
                results.append(res)
        return results


class SyntheticCOCODataModule(COCOInstanceDataModule):
    """Small synthetic COCO-format dataset of shapes, written by ``prepare_data`` into ``root``
    (default ``~/.cache/mamba_dense/datasets/coco_shapes``) and read by the COCO reader.

    Args:
        root: dataset folder (written once, reused as it is).
        batch_size, val_batch_size, num_workers: loader settings.
        resize: see ``COCOInstanceDataModule``; the synthetic defaults use 128-160 px scales.
        num_train, num_val, seed: writer settings.
    """

    def __init__(self, root: str | None = None, batch_size: int = 2, val_batch_size: int = 2, num_workers: int = 0,
                 resize: bool = False, num_train: int = 12, num_val: int = 4, seed: int = 0) -> None:
        root = root if root is not None else str(default_cache_dir() / "datasets" / "coco_shapes")
        super().__init__(root, batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         resize=resize, train_scales=(128, 144, 160), test_scale=160, max_size=256)
        self.num_train, self.num_val, self.seed = num_train, num_val, seed

    def prepare_data(self) -> None:
        write_coco_like(self.root, num_train=self.num_train, num_val=self.num_val, seed=self.seed)

    def _cats(self) -> list[dict[str, Any]]:
        self.prepare_data()  # categories are read from the files it writes
        return super()._cats()
