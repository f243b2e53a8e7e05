"""Metrics: ADE20K-style scores from a confusion matrix, COCO AP through the real COCOeval."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchmetrics.classification import MulticlassJaccardIndex

from mamba_dense.tasks.metrics import COCOEvaluator, per_class_table, segmentation_scores


def test_segmentation_scores_match_torchmetrics_and_skip_absent_classes():
    target = torch.tensor([[0, 0, 1, 1], [1, 255, 255, 2]])
    preds = torch.tensor([[0, 3, 1, 1], [2, 0, 1, 2]])  # class 4: in neither -> NaN, left out
    metric = MulticlassJaccardIndex(5, average="macro", ignore_index=255)
    metric.update(preds, target)
    scores = segmentation_scores(metric.confmat)
    iou = scores["IoU"]
    # class 0: tp 1, union 2; class 1: tp 2, union 3; class 2: tp 1, union 2; class 3: predicted only -> 0
    torch.testing.assert_close(iou[:4], torch.tensor([0.5, 2 / 3, 0.5, 0.0], dtype=iou.dtype))
    assert torch.isnan(iou[4]) and torch.isnan(scores["Acc"][3])
    assert float(scores["mIoU"]) == pytest.approx(5 / 12) == pytest.approx(float(metric.compute()))
    assert float(scores["aAcc"]) == pytest.approx(4 / 6)
    assert float(scores["mAcc"]) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    table = per_class_table(scores, ["a", "b", "c", "d", "e"])
    assert "mIoU 41.67" in table and table.splitlines()[2].startswith("a")


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


# two images; category ids 3 and 7 are not contiguous: labels 1 -> 3, 2 -> 7
OBJECTS = {
    11: (60, 80, [(1, _rect(60, 80, 5, 25, 10, 40)), (2, _rect(60, 80, 30, 58, 45, 78))]),
    12: (50, 50, [(2, _rect(50, 50, 0, 50, 0, 20))]),
}
LABEL_TO_CAT = {1: 3, 2: 7}


def _coco_gt() -> COCO:
    images, anns = [], []
    for image_id, (h, w, objs) in OBJECTS.items():
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        for label, m in objs:
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": LABEL_TO_CAT[label], "iscrowd": 0,
                "segmentation": rle, "area": float(m.sum()), "bbox": mask_utils.toBbox(rle).tolist(),
            })
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _perfect_prediction(objs, scale: int = 1) -> dict:
    masks = torch.stack([torch.from_numpy(m).float() for _, m in objs])[:, None]
    boxes = []
    for _, m in objs:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    boxes = torch.tensor(boxes, dtype=torch.float32)
    if scale > 1:  # the model saw the image at 1/scale
        masks = masks[..., ::scale, ::scale]
        boxes = boxes / scale
    return {
        "boxes": boxes,
        "labels": torch.tensor([label for label, _ in objs]),
        "scores": torch.linspace(0.9, 0.8, len(objs)),
        "masks": masks,
    }


def _target(objs) -> dict:
    pred = _perfect_prediction(objs)
    return {"boxes": pred["boxes"], "labels": pred["labels"], "masks": pred["masks"][:, 0].to(torch.uint8)}


def test_cocoeval_perfect_predictions_give_ap_one():
    ev = COCOEvaluator(LABEL_TO_CAT)
    for image_id, (h, w, objs) in OBJECTS.items():
        results = ev.add_predictions(image_id, _perfect_prediction(objs), out_size=(h, w))
        assert {r["category_id"] for r in results} <= {3, 7}
        assert isinstance(results[0]["segmentation"]["counts"], str)  # JSON-ready RLE
    metrics, summary = ev.evaluate(_coco_gt())
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(1.0), (iou_type, name)
    assert "Average Precision" in summary


def test_cocoeval_predictions_rescaled_to_original_size():
    ev = COCOEvaluator(LABEL_TO_CAT)
    for image_id, (h, w, objs) in OBJECTS.items():
        ev.add_predictions(image_id, _perfect_prediction(objs, scale=2), out_size=(h, w))
    metrics, _ = ev.evaluate(_coco_gt())
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP50"] == pytest.approx(1.0)


def test_cocoeval_box_only_predictions_rescaled_with_in_size():
    """Without masks the prediction's size is unknown: boxes were left unscaled, silently."""
    boxes_ev, masks_ev = COCOEvaluator(LABEL_TO_CAT), COCOEvaluator(LABEL_TO_CAT)
    for image_id, (h, w, objs) in OBJECTS.items():
        pred = _perfect_prediction(objs, scale=2)
        masks_ev.add_predictions(image_id, pred, out_size=(h, w))
        boxes_only = {k: v for k, v in pred.items() if k != "masks"}
        with pytest.raises(ValueError, match=r"no masks.*Fix: pass in_size"):
            boxes_ev.to_results(image_id, boxes_only, out_size=(h, w))
        results = boxes_ev.add_predictions(image_id, boxes_only, out_size=(h, w), in_size=(h // 2, w // 2))  # the model saw it at half size
        assert "segmentation" not in results[0]
    assert [r["bbox"] for r in boxes_ev.results] == [r["bbox"] for r in masks_ev.results]
    metrics, _ = boxes_ev.evaluate(_coco_gt(), iou_types=("bbox",))
    assert metrics["bbox_AP"] == pytest.approx(1.0)


def test_cocoeval_ground_truth_from_targets_and_wrong_labels():
    ev = COCOEvaluator(LABEL_TO_CAT)
    for image_id, (h, w, objs) in OBJECTS.items():
        ev.add_predictions(image_id, _perfect_prediction(objs))
        ev.add_ground_truth(image_id, _target(objs), (h, w))
    metrics, _ = ev.evaluate()
    assert metrics["segm_AP"] == pytest.approx(1.0)

    ev = COCOEvaluator(LABEL_TO_CAT)
    for image_id, (h, w, objs) in OBJECTS.items():
        pred = _perfect_prediction(objs)
        pred["labels"] = 3 - pred["labels"]  # swap the classes
        ev.add_predictions(image_id, pred)
        ev.add_ground_truth(image_id, _target(objs), (h, w))
    metrics, _ = ev.evaluate()
    assert metrics["bbox_AP"] == pytest.approx(0.0)


def test_cocoeval_no_detections():
    ev = COCOEvaluator(LABEL_TO_CAT)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 60, 80)}
    ev.add_predictions(11, empty)
    metrics, _ = ev.evaluate(_coco_gt())
    assert metrics["bbox_AP"] == 0.0 and metrics["segm_AP"] == 0.0


def test_cocoeval_perturbed_prediction_scores_between_zero_and_one():
    ev = COCOEvaluator(LABEL_TO_CAT)
    for image_id, (h, w, objs) in OBJECTS.items():
        pred = _perfect_prediction(objs)
        if image_id == 11:  # shift the first object by 6 px: IoU ~0.6, a hit at 0.5 but not at 0.75
            pred["masks"][0] = torch.roll(pred["masks"][0], shifts=6, dims=-1)
            pred["boxes"][0, [0, 2]] += 6
        ev.add_predictions(image_id, pred, out_size=(h, w))
    metrics, _ = ev.evaluate(_coco_gt())
    for iou_type in ("bbox", "segm"):
        assert 0.0 < metrics[f"{iou_type}_AP"] < 1.0, iou_type
        assert metrics[f"{iou_type}_AP50"] == pytest.approx(1.0) and metrics[f"{iou_type}_AP75"] < 1.0
