"""Dataset-level metrics: ADE20K-style mIoU/mAcc/aAcc from a confusion matrix, COCO AP via COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used, so the module loads without pycocotools
    from pycocotools.coco import COCO

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------- semantic


def segmentation_scores(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """mmseg's ADE20K metrics from a (K, K) confusion matrix, rows = target, columns = prediction.

    IoU of a class that is neither in the targets nor in the predictions is NaN and left out of
    the mean (nanmean), as in mmseg and torchmetrics' macro average; accuracy of a class absent
    from the targets is NaN likewise.

    Returns:
        dict with scalars mIoU, mAcc, aAcc and per-class tensors IoU, Acc (K,).
    """
    cm = confmat.double()
    tp = cm.diag()
    area_target, area_pred = cm.sum(1), cm.sum(0)
    union = area_target + area_pred - tp
    nan = torch.tensor(float("nan"), dtype=cm.dtype, device=cm.device)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(area_target > 0, tp / area_target.clamp_min(1), nan)
    return {
        "mIoU": iou.nanmean(),
        "mAcc": acc.nanmean(),
        "aAcc": tp.sum() / area_target.sum().clamp_min(1),
        "IoU": iou,
        "Acc": acc,
    }


def per_class_table(scores: Mapping[str, torch.Tensor], class_names: Sequence[str] | None = None) -> str:
    """Plain-text per-class IoU / Acc table (percent), followed by the summary line."""
    iou, acc = scores["IoU"], scores["Acc"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'IoU':>7} {'Acc':>7}", "-" * (width + 16)]
    for name, i, a in zip(names, iou.tolist(), acc.tolist()):
        lines.append(f"{name:<{width}} {100 * i:7.2f} {100 * a:7.2f}")
    lines.append("-" * (width + 16))
    lines.append(
        f"mIoU {100 * float(scores['mIoU']):.2f}  mAcc {100 * float(scores['mAcc']):.2f}  "
        f"aAcc {100 * float(scores['aAcc']):.2f}"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- COCO


def _mask_utils():
    from pycocotools import mask as mask_utils

    return mask_utils



def encode_masks(masks: torch.Tensor) -> list[dict]:
    """(N, H, W) bool/uint8 masks -> COCO RLEs with str counts (JSON-ready)."""
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.to(torch.uint8).permute(1, 2, 0).cpu().numpy())  # (H, W, N)
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(arr)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().float().cpu()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def _private_copy(gt: "COCO", img_ids: Sequence[int]) -> "COCO":
    """The ground truth of ``img_ids`` in a COCO object of its own. NOTE: COCOeval rewrites every
    ground truth's ``segmentation`` as an RLE with ``bytes`` counts and adds ``ignore`` keys, in
    place: on the datamodule's own object the next epoch's dataset read those (a crash at the
    second evaluation). Annotation dicts are copied (one level: COCOeval only reassigns keys)."""
    from pycocotools.coco import COCO

    keep = set(img_ids)
    doc = {k: v for k, v in gt.dataset.items() if k not in ("images", "annotations")}
    doc["images"] = [dict(im) for im in gt.dataset.get("images", []) if im["id"] in keep]
    doc["annotations"] = [dict(a) for a in gt.dataset.get("annotations", []) if a["image_id"] in keep]
    out = COCO()
    out.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        out.createIndex()
    return out


class COCOEvaluator:
    """Collects Mask R-CNN outputs as COCO results and scores them with pycocotools' COCOeval.

    Predictions are converted with original category ids (`label_to_cat_id`) and, when the
    ground truth's image size differs from the size the model saw, rescaled to it. Ground
    truth is either a `COCO` object (the datamodule's `coco_gt`) or built from the targets
    passed to `add_ground_truth` (labels used as category ids through the same mapping).

    Args:
        label_to_cat_id: contiguous label -> COCO category id; None = identity.
        mask_threshold: probability threshold of torchvision's soft masks.
    """

    def __init__(self, label_to_cat_id: Mapping[int, int] | None = None, mask_threshold: float = 0.5) -> None:
        self.label_to_cat_id = dict(label_to_cat_id) if label_to_cat_id is not None else None
        self.mask_threshold = mask_threshold
        self.reset()

    def reset(self) -> None:
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self._gt_images: dict[int, dict] = {}
        self._gt_anns: list[dict] = []

    def cat_id(self, label: int) -> int:
        if self.label_to_cat_id is None:
            return int(label)
        if int(label) not in self.label_to_cat_id:
            raise KeyError(f"label {int(label)} has no category id in label_to_cat_id.")
        return int(self.label_to_cat_id[int(label)])

    def to_results(self, image_id: int, pred: Mapping[str, torch.Tensor], out_size: tuple[int, int] | None = None,
                   in_size: tuple[int, int] | None = None) -> list[dict]:
        """torchvision detections of one image -> COCO result dicts.

        Args:
            image_id: COCO image id.
            pred: boxes (N, 4) xyxy, labels (N,), scores (N,), optional masks (N, 1, h, w) probabilities.
            out_size: (H, W) of the ground-truth image when it differs from the prediction size.
            in_size: (H, W) the prediction was made at; default: the masks' size (needed with
                ``out_size`` when there are no masks).
        """
        boxes, labels, scores = pred["boxes"], pred["labels"], pred["scores"]
        masks = pred.get("masks")
        if masks is not None and masks.ndim == 3:
            masks = masks[:, None]
        if in_size is None and masks is not None:
            in_size = tuple(masks.shape[-2:])
        if out_size is not None and in_size is None:
            raise ValueError(f"to_results(image_id={image_id}): out_size={tuple(out_size)} but the detections have no "
                             "masks to tell the size they were made at. Fix: pass in_size=(H, W) of the input image")
        if out_size is not None and tuple(in_size) != tuple(out_size):
            h, w = in_size
            scale = boxes.new_tensor([out_size[1] / w, out_size[0] / h, out_size[1] / w, out_size[0] / h])
            boxes = boxes * scale
            if masks is not None:
                masks = F.interpolate(masks.float(), size=out_size, mode="bilinear", align_corners=False)
        rles = encode_masks(masks[:, 0] > self.mask_threshold) if masks is not None else [None] * len(boxes)
        out = []
        for box, label, score, rle in zip(_xyxy_to_xywh(boxes), labels.tolist(), scores.tolist(), rles):
            r = {"image_id": int(image_id), "category_id": self.cat_id(label), "bbox": box, "score": float(score)}
            if rle is not None:
                r["segmentation"] = rle
            out.append(r)
        return out

    def add_predictions(self, image_id: int, pred: Mapping[str, torch.Tensor], out_size: tuple[int, int] | None = None,
                        in_size: tuple[int, int] | None = None) -> list[dict]:
        results = self.to_results(image_id, pred, out_size, in_size)
        self.results.extend(results)
        self.image_ids.append(int(image_id))
        return results

    def add_ground_truth(self, image_id: int, target: Mapping[str, torch.Tensor], size: tuple[int, int]) -> None:
        """Record one image's targets (boxes xyxy, labels, masks (N, H, W), iscrowd) as COCO GT."""
        self._gt_images[int(image_id)] = {"id": int(image_id), "height": int(size[0]), "width": int(size[1])}
        masks = target.get("masks")
        rles = encode_masks(masks > 0) if masks is not None else [None] * len(target["boxes"])
        crowd = target.get("iscrowd", torch.zeros(len(target["boxes"]), dtype=torch.int64)).tolist()
        for box, label, rle, iscrowd in zip(_xyxy_to_xywh(target["boxes"]), target["labels"].tolist(), rles, crowd):
            ann = {
                "id": len(self._gt_anns) + 1,
                "image_id": int(image_id),
                "category_id": self.cat_id(label),
                "bbox": box,
                "iscrowd": int(iscrowd),
                "area": float(_mask_utils().area(rle)) if rle is not None else box[2] * box[3],
            }
            if rle is not None:
                ann["segmentation"] = rle
            self._gt_anns.append(ann)

    def ground_truth(self) -> COCO:
        """COCO object of the targets given to `add_ground_truth`."""
        cat_ids = {a["category_id"] for a in self._gt_anns} | {r["category_id"] for r in self.results}
        if self.label_to_cat_id:
            cat_ids |= set(self.label_to_cat_id.values())
        from pycocotools.coco import COCO

        gt = COCO()
        gt.dataset = {
            "images": list(self._gt_images.values()),
            "annotations": copy.deepcopy(self._gt_anns),
            "categories": [{"id": c, "name": str(c)} for c in sorted(cat_ids)],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt

    def evaluate(self, coco_gt: COCO | None = None, iou_types: Sequence[str] = ("bbox", "segm")) -> tuple[dict[str, float], str]:
        """COCOeval on the collected results over the collected image ids.

        Returns:
            ({"bbox_AP": ..., "bbox_AP50": ..., ..., "segm_APl": ...}, printed summary text).
        """
        gt = coco_gt if coco_gt is not None else self.ground_truth()
        img_ids = sorted(set(self.image_ids))
        gt = _private_copy(gt, img_ids)
        metrics: dict[str, float] = {}
        text = io.StringIO()
        for iou_type in iou_types:
            if iou_type == "segm":
                dets = [{k: v for k, v in r.items() if k != "bbox"} for r in self.results if "segmentation" in r]
            else:
                dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in self.results]
            if not dets or not img_ids:
                metrics.update({f"{iou_type}_{n}": 0.0 for n in AP_NAMES})
                continue
            with contextlib.redirect_stdout(text):
                print(f"--- {iou_type} ---")
                dt = gt.loadRes(copy.deepcopy(dets))
                from pycocotools.cocoeval import COCOeval

                ev = COCOeval(gt, dt, iou_type)
                ev.params.imgIds = img_ids
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            metrics.update({f"{iou_type}_{n}": float(v) for n, v in zip(AP_NAMES, ev.stats[:6])})
        return metrics, text.getvalue()
