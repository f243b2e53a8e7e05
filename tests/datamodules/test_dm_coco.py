"""COCOInstanceDataModule on synthetic COCO files and the real COCO val2017 samples."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from mamba_dense.datamodules import COCOInstanceDataModule, DataError, SyntheticCOCODataModule, write_coco_like


def _panoptic(root, **kw) -> COCOInstanceDataModule:
    ann = "instances_things_only.json"
    return COCOInstanceDataModule(str(root), train_ann=ann, val_ann=ann, train_images="images", val_images="images",
                                  num_workers=0, **kw)


def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _gt_as_predictions(dm, split):
    """Feed the (non-crowd) targets back as detections and score them with COCOeval."""
    results = []
    for _, targets in getattr(dm, f"{split}_dataloader")():
        outs = []
        for t in targets:
            keep = t["iscrowd"] == 0
            outs.append({"boxes": t["boxes"][keep], "labels": t["labels"][keep], "scores": torch.ones(int(keep.sum())),
                         "masks": t["masks"][keep].float()[:, None]})
        results += dm.to_coco_results(outs, targets)
    gt = dm.coco_gt(split)
    stats = {}
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
        stats[iou_type] = ev.stats[0]
    return stats


@pytest.mark.parametrize("resize", [False, True])
def test_real_panoptic_round_trip(coco_panoptic_real, resize, snap):
    before = snap(coco_panoptic_real)
    with pytest.warns(UserWarning, match="renumbered"):  # this file has an annotation with id 0
        dm = _panoptic(coco_panoptic_real, resize=resize, val_batch_size=2)
        assert dm.num_classes == 80
    # category ids are not contiguous (1..90 with gaps): labels 1..80 and back
    assert dm.label_to_cat_id[1] == 1 and dm.label_to_cat_id[80] == 90
    assert all(dm.cat_id_to_label[c] == k for k, c in dm.label_to_cat_id.items())
    assert len(dm.class_names) == 80 and dm.class_names[0] == "person"
    stats = _gt_as_predictions(dm, "val")
    assert stats["bbox"] == pytest.approx(1.0) and stats["segm"] == pytest.approx(1.0)
    assert snap(coco_panoptic_real) == before


def test_real_panoptic_crowd_handling(coco_panoptic_real):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = _panoptic(coco_panoptic_real, hflip_prob=0.0)
        dm.setup("fit")
    val = [dm.datasets["val"][i][1] for i in range(2)]
    train = [dm.datasets["train"][i][1] for i in range(2)]
    assert sum(int(t["iscrowd"].sum()) for t in val) == 3  # RLE crowd regions kept for evaluation
    assert all(int(t["iscrowd"].sum()) == 0 for t in train)  # and dropped from training targets
    assert [len(v["boxes"]) for v in val] == [len(t["boxes"]) + int(v["iscrowd"].sum()) for t, v in zip(train, val)]
    assert sum(len(t["boxes"]) for t in train) == 40
    image, target = dm.datasets["train"][0]
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0  # not normalized
    n = len(target["boxes"])
    assert target["masks"].shape == (n, *image.shape[1:]) and target["masks"].dtype == torch.uint8
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    for box, mask in zip(target["boxes"], target["masks"]):  # boxes agree with the decoded RLE masks
        assert torch.allclose(box, torch.tensor(_mask_box(mask), dtype=torch.float32), atol=1.5)


def test_real_mmpose_polygons_and_flip(coco_mmpose_real):
    dm = COCOInstanceDataModule(str(coco_mmpose_real), train_ann="test_coco.json", val_ann="test_coco.json",
                                train_images="images", val_images="images", num_workers=0, hflip_prob=1.0)
    assert dm.num_classes == 1 and dm.class_names == ["person"] and dm.label_to_cat_id == {1: 1}
    dm.setup("fit")
    flipped_img, flipped = dm.datasets["train"][2]
    img, plain = dm.datasets["val"][2]
    assert torch.equal(flipped_img, img.flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    w = img.shape[-1]
    x0, y0, x1, y1 = plain["boxes"].unbind(1)
    mirrored = torch.stack([w - x1, y0, w - x0, y1], 1)
    assert torch.allclose(flipped["boxes"], mirrored, atol=1e-3)
    assert torch.equal(flipped["labels"], plain["labels"]) and (plain["labels"] == 1).all()
    images, targets = next(iter(dm.val_dataloader()))
    assert isinstance(images, list) and len(images) == 2 and images[0].shape != images[1].shape
    assert _gt_as_predictions(dm, "val")["segm"] == pytest.approx(1.0)


def test_synthetic_layout_and_mapping(coco_root, snap):
    before = snap(coco_root)
    dm = COCOInstanceDataModule(str(coco_root), num_workers=0, batch_size=2)
    assert dm.label_to_cat_id == {1: 1, 2: 3, 3: 7, 4: 9}
    dm.setup("fit")
    gt_train, gt_val = dm.coco_gt("train"), dm.coco_gt("val")
    # images without annotations: skipped in training only
    assert len(dm.datasets["val"]) == len(gt_val.imgs) == 3
    assert len(dm.datasets["train"]) == len(gt_train.imgs) - 1 == 5
    # the degenerate annotation (zero-width box) is never a target
    n_train = sum(len(dm.datasets["train"][i][1]["boxes"]) for i in range(5))
    n_valid = sum(1 for a in gt_train.dataset["annotations"] if not a["iscrowd"] and a["bbox"][2] >= 1)
    assert n_train == n_valid == len(gt_train.dataset["annotations"]) - 2
    # compressed RLE (image 1) and uncompressed crowd RLE (image 0) decode
    _, t0 = dm.datasets["val"][0]
    assert int(t0["iscrowd"].sum()) == 1 and t0["masks"][t0["iscrowd"] == 1].sum() > 0
    empty_img, empty = dm.datasets["val"][2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, *empty_img.shape[1:])
    assert _gt_as_predictions(dm, "val") == {"bbox": pytest.approx(1.0), "segm": pytest.approx(1.0)}
    assert snap(coco_root) == before


def test_dropped_boxes_keep_masks_aligned(coco_root, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(coco_root, root)
    path = root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    image = doc["images"][1]
    anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
    # a 1.6 px wide sliver first: the 0.5x resize below shrinks it under 1 px, so albumentations drops it
    sliver = {"id": 99999, "image_id": image["id"], "category_id": 9, "iscrowd": 0, "area": 40.0,
              "bbox": [5.0, 5.0, 1.6, 30.0], "segmentation": [[5.0, 5.0, 6.6, 5.0, 6.6, 35.0, 5.0, 35.0]]}
    doc["annotations"] = [sliver] + doc["annotations"]
    path.write_text(json.dumps(doc))
    dm = COCOInstanceDataModule(str(root), num_workers=0, resize=True, train_scales=(48,), test_scale=48,
                                max_size=1000, hflip_prob=0.0)
    ds = dm._get("train")
    _, target = ds[ds.ids.index(image["id"])]
    assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"]) == len(anns)
    for box, mask in zip(target["boxes"], target["masks"]):
        if mask.any():
            assert torch.allclose(box, torch.tensor(_mask_box(mask), dtype=torch.float32), atol=2.0)


def test_torchvision_transform_accepts_batch(coco_root):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    for resize in (False, True):
        dm = COCOInstanceDataModule(str(coco_root), num_workers=0, resize=resize, train_scales=(96, 128),
                                    test_scale=128, max_size=256)
        images, targets = next(iter(dm.train_dataloader()))
        transform = GeneralizedRCNNTransform(**dm.maskrcnn_transform_kwargs()).train()
        batch, out_targets = transform(images, targets)
        if resize:  # resized once, by the datamodule
            assert [tuple(s) for s in batch.image_sizes] == [tuple(i.shape[1:]) for i in images]
            assert min(images[0].shape[1:]) in (96, 128) or max(images[0].shape[1:]) == 256
        assert all(t["masks"].shape[1:] == s for t, s in zip(out_targets, batch.image_sizes))


def test_synthetic_datamodule(tmp_path, snap):
    dm = SyntheticCOCODataModule(root=str(tmp_path / "coco"), num_train=4, num_val=2)
    assert dm.num_classes == 4 and dm.class_names == ["circle", "square", "triangle", "star"]
    dm.prepare_data()
    before = snap(tmp_path / "coco")
    dm.prepare_data()
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == len(targets) == 2
    assert snap(tmp_path / "coco") == before


def test_bad_inputs(coco_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(coco_root, root)
    ann = root / "annotations" / "instances_val2017.json"
    good = json.loads(ann.read_text())
    make = lambda: COCOInstanceDataModule(str(root), num_workers=0)  # noqa: E731

    ann.write_text(json.dumps(good)[:-20])
    with pytest.raises(DataError, match=r"instances_val2017\.json: line 1 column \d+: malformed JSON.*Fix"):
        make().coco_gt("val")

    doc = json.loads(json.dumps(good))
    del doc["annotations"][0]["bbox"]
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotations\[0\].*missing field\(s\) \['bbox'\]"):
        make().coco_gt("val")

    doc = json.loads(json.dumps(good))
    doc["annotations"][0]["category_id"] = 42
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotations\[0\] \(id=\d+\)\.category_id: unknown category_id 42"):
        make().coco_gt("val")

    doc = json.loads(json.dumps(good))
    doc["images"][0]["height"] += 7
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"images\[id=\d+\]\.height/width"):
        make()._get("val")[0]

    doc = json.loads(json.dumps(good))
    doc["categories"][0]["name"] = "renamed"
    ann.write_text(json.dumps(doc))
    dm = make()
    dm.coco_gt("train")
    with pytest.raises(DataError, match="categories: differ"):
        dm.coco_gt("val")

    ann.write_text(json.dumps(good))
    img = root / "val2017" / good["images"][0]["file_name"]
    img.write_bytes(img.read_bytes()[:200])
    with pytest.raises(DataError, match="pixel data: cannot decode"):
        make()._get("val")[0]
    img.unlink()
    with pytest.raises(FileNotFoundError, match=r"listed in .*instances_val2017\.json images\[id=\d+\]\.file_name"):
        make()._get("val")[0]
    with pytest.raises(FileNotFoundError, match=r"instances_nope\.json.*Fix"):
        COCOInstanceDataModule(str(root), val_ann="annotations/instances_nope.json").coco_gt("val")


def test_writer_is_deterministic(tmp_path):
    a = write_coco_like(tmp_path / "a", num_train=2, num_val=2, seed=3)
    b = write_coco_like(tmp_path / "b", num_train=2, num_val=2, seed=3)
    for rel in ("annotations/instances_train2017.json", "annotations/instances_val2017.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    name = json.loads((a / "annotations/instances_val2017.json").read_text())["images"][0]["file_name"]
    assert np.array_equal(np.asarray(Image.open(a / "val2017" / name)), np.asarray(Image.open(b / "val2017" / name)))


def test_real_mask_areas_match_pycocotools(coco_panoptic_real, coco_mmpose_real):
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the panoptic file renumbers an id-0 annotation
        panoptic = _panoptic(coco_panoptic_real)
        mmpose = COCOInstanceDataModule(str(coco_mmpose_real), train_ann="test_coco.json", val_ann="test_coco.json",
                                        train_images="images", val_images="images", num_workers=0)
    for dm, rle_areas_exact in ((panoptic, True), (mmpose, False)):
        ds, gt = dm._get("val"), dm.coco_gt("val")
        checked = 0
        for i, image_id in enumerate(ds.ids):
            _, target = ds[i]  # no resize: masks on the stored pixel grid
            info = gt.imgs[image_id]
            anns = [a for a in gt.imgToAnns[image_id] if min(a["bbox"][2:]) >= 1 and a["segmentation"]]
            expected = []
            for a in anns:
                seg = a["segmentation"]
                rle = (mask_utils.merge(mask_utils.frPyObjects(seg, info["height"], info["width"]))
                       if isinstance(seg, list) else mask_utils.frPyObjects(seg, info["height"], info["width"])
                       if isinstance(seg["counts"], list) else seg)
                expected.append(float(mask_utils.area(rle)))
            assert target["area"].tolist() == expected  # decoded mask pixels == pycocotools' area of the RLE
            ann_area = torch.tensor([a["area"] for a in anns])
            if rle_areas_exact:  # areas derived from the panoptic PNGs: exact
                assert target["area"].tolist() == ann_area.tolist()
            else:  # COCO polygon areas are computed on the polygon, not the raster: within 2 %
                assert torch.allclose(target["area"].double(), ann_area.double(), rtol=0.02)
            checked += len(anns)
        assert checked == {True: 43, False: 14}[rle_areas_exact]


def test_missing_root_and_image_dir(coco_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: dataset folder not found\. Expected layout: .*train2017/"
                                                r"\*\.jpg.*annotations/instances_\{train,val\}2017\.json.*Fix: `root`"):
        COCOInstanceDataModule(str(tmp_path / "nowhere")).setup("fit")
    dm = COCOInstanceDataModule(str(coco_root), val_images="val2018", num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"val2018: image folder of split 'val' not found.*Fix: `val_images`"):
        dm.setup("validate")


def _edit(coco_root, tmp_path, edit):
    root = tmp_path / "edited"
    shutil.copytree(coco_root, root)
    path = root / "annotations" / "instances_val2017.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return root, doc


def test_annotations_referencing_missing_images(coco_root, tmp_path):
    def edit(doc):
        doc["annotations"][0]["image_id"] = 4242
        doc["annotations"][1]["category_id"] = 42

    root, doc = _edit(coco_root, tmp_path, edit)
    with pytest.raises(DataError, match=r"annotations\[\d+\] \(id=\d+\)\.image_id: unknown image_id 4242.*on_missing='skip'"):
        COCOInstanceDataModule(str(root), num_workers=0).coco_gt("val")
    dm = COCOInstanceDataModule(str(root), num_workers=0, on_missing="skip")
    with pytest.warns(UserWarning, match=r"COCO val split .*skipped 2 item\(s\): 1 annotation unknown image id .*"
                                         r"1 annotation unknown category id"):
        dm.setup("validate")
    assert dm.skipped["val"]["annotation_unknown_image_id"] == 1
    assert len(dm.coco_gt("val").anns) == len(doc["annotations"]) - 2
    assert all(len(dm.datasets["val"][i][1]["boxes"]) >= 0 for i in range(len(dm.datasets["val"])))


def _plain_polygon_anns(doc):
    return [a for a in doc["annotations"] if not a["iscrowd"] and isinstance(a["segmentation"], list)]


@pytest.mark.parametrize("seg", ["missing", None, [], [[10.0, 10.0, 50.0, 10.0]], [10.0, 10.0, 50.0, 10.0, 30.0, 40.0]])
def test_annotation_without_mask_is_named_or_skipped(coco_root, tmp_path, seg):
    """COCOeval rasterizes every ground truth: an annotation without a mask crashed it inside
    pycocotools at the end of the first validation epoch (a training epoch later)."""
    picked = []

    def edit(doc):
        ann = _plain_polygon_anns(doc)[0]
        picked.append(doc["annotations"].index(ann))
        if seg == "missing":
            del ann["segmentation"]
        else:
            ann["segmentation"] = seg

    root, doc = _edit(coco_root, tmp_path, edit)
    index = picked[0]
    bad = doc["annotations"][index]
    with pytest.raises(DataError, match=rf"annotations\[{index}\] \(id={bad['id']}\)\.segmentation: .*Fix: give it a "
                                        r"polygon.*on_missing='skip'"):
        COCOInstanceDataModule(str(root), num_workers=0).coco_gt("val")
    dm = COCOInstanceDataModule(str(root), num_workers=0, on_missing="skip")
    with pytest.warns(UserWarning, match=r"1 annotation without mask"):
        dm.setup("validate")
    gt = dm.coco_gt("val")
    assert bad["id"] not in gt.anns and len(gt.anns) == len(doc["annotations"]) - 1
    # what was kept is scored without a crash, ground truth as predictions: AP 1
    stats = _gt_as_predictions(dm, "val")
    assert stats["bbox"] == pytest.approx(1.0) and stats["segm"] == pytest.approx(1.0)


def test_invalid_polygon_parts_dropped_in_targets_and_ground_truth(coco_root, tmp_path):
    """A part with fewer than 3 points or an odd number of coordinates is dropped (detectron2,
    mmdet) from the targets and from COCOeval's ground truth alike; the drop is counted."""
    def edit(doc):
        ann = _plain_polygon_anns(doc)[0]
        ann["segmentation"] = ann["segmentation"] + [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]]

    root, doc = _edit(coco_root, tmp_path, edit)
    ann = _plain_polygon_anns(doc)[0]
    dm = COCOInstanceDataModule(str(root), num_workers=0)
    with pytest.warns(UserWarning, match=rf"1 polygon part invalid \(e\.g\. \[{ann['id']}\]\)"):
        dm.setup("validate")
    gt_ann = dm.coco_gt("val").anns[ann["id"]]
    assert gt_ann["segmentation"] == ann["segmentation"][:-2]
    stats = _gt_as_predictions(dm, "val")
    assert stats["segm"] == pytest.approx(1.0)


def test_degenerate_and_outside_boxes_counted(coco_root, tmp_path):
    def edit(doc):
        anns = _plain_polygon_anns(doc)
        anns[0]["bbox"], anns[0]["area"] = [10.0, 10.0, 0.0, 0.0], 0.0  # COCO has such: routine
        image = next(im for im in doc["images"] if im["id"] == anns[1]["image_id"])
        anns[1]["bbox"] = [image["width"] + 5.0, 3.0, 20.0, 20.0]  # nothing left inside the image: warned

    root, doc = _edit(coco_root, tmp_path, edit)
    anns = _plain_polygon_anns(doc)
    dm = COCOInstanceDataModule(str(root), num_workers=0)
    with pytest.warns(UserWarning, match=rf"1 annotation degenerate box .*1 annotation box outside image "
                                         rf"\(e\.g\. \[{anns[1]['id']}\]\)"):
        dm.setup("validate")
    ds = dm.datasets["val"]
    n_targets = sum(len(ds[i][1]["boxes"]) for i in range(len(ds)))
    assert n_targets == len(doc["annotations"]) - 2


def test_train_split_without_instances_raises(coco_root, tmp_path):
    root = tmp_path / "crowd_only"
    shutil.copytree(coco_root, root)
    path = root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    for a in doc["annotations"]:
        a["iscrowd"] = 1  # crowd regions are never trained on
    path.write_text(json.dumps(doc))
    dm = COCOInstanceDataModule(str(root), num_workers=0)
    with pytest.raises(DataError, match=r"instances_train2017\.json: annotations: no training image keeps an instance "
                                        r"\(of 6 images and \d+ annotations.*Fix: check that the file has masks"):
        dm.setup("fit")


def test_messages_name_file_ids_after_renumbering(coco_root, tmp_path):
    def edit(doc):
        doc["annotations"][0]["id"] = 0  # renumbered 1..N in memory
        _plain_polygon_anns(doc)[1]["segmentation"] = {"counts": [4], "size": [2, 2]}

    root, doc = _edit(coco_root, tmp_path, edit)
    bad = next(a for a in doc["annotations"] if isinstance(a["segmentation"], dict) and a["segmentation"]["size"] == [2, 2])
    dm = COCOInstanceDataModule(str(root), num_workers=0)
    with pytest.warns(UserWarning, match="renumbered"):
        dm.setup("validate")
    ds = dm.datasets["val"]
    (moved,) = [a for a in dm.coco_gt("val").anns.values() if a.get("_file_id") == bad["id"]]
    assert moved["id"] != bad["id"]  # in memory, the file's id is another annotation's or none
    index = ds.ids.index(bad["image_id"])
    with pytest.raises(DataError, match=rf"annotations\[id={bad['id']}\]\.segmentation\.size"):
        ds[index]


def test_missing_area_is_the_mask_area(coco_root, tmp_path):
    from pycocotools import mask as mask_utils

    def edit(doc):
        for a in doc["annotations"]:
            del a["area"]

    root, doc = _edit(coco_root, tmp_path, edit)
    gt = COCOInstanceDataModule(str(root), num_workers=0).coco_gt("val")
    for a in doc["annotations"]:
        image = gt.imgs[a["image_id"]]
        seg = a["segmentation"]
        rle = (mask_utils.merge(mask_utils.frPyObjects(seg, image["height"], image["width"])) if isinstance(seg, list)
               else mask_utils.frPyObjects(seg, image["height"], image["width"]) if isinstance(seg["counts"], list)
               else seg)
        area = float(mask_utils.area(rle))
        assert gt.anns[a["id"]]["area"] == area and 0 < area < a["bbox"][2] * a["bbox"][3] + 1e-6


def test_image_info_file_predicts_but_does_not_train(coco_root, tmp_path):
    """COCO's image_info_test-dev2017.json has images and categories, no annotations."""
    root = tmp_path / "testdev"
    shutil.copytree(coco_root, root)
    doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    del doc["annotations"]
    (root / "annotations" / "image_info_test.json").write_text(json.dumps(doc))
    dm = COCOInstanceDataModule(str(root), test_ann="annotations/image_info_test.json", num_workers=0)
    dm.setup("predict")
    images = [img for batch, _ in dm.predict_dataloader() for img in batch]
    assert len(images) == len(doc["images"]) and dm.coco_gt("test").image_info_only
    dm = COCOInstanceDataModule(str(root), train_ann="annotations/image_info_test.json", train_images="val2017",
                                num_workers=0)
    with pytest.raises(DataError, match="no training image keeps an instance"):
        dm.setup("fit")


def test_missing_and_corrupt_images_skipped_and_counted(coco_root, tmp_path):
    from mamba_dense.datamodules import CorruptFileError

    root = tmp_path / "imgs"
    shutil.copytree(coco_root, root)
    doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    names = [im["file_name"] for im in sorted(doc["images"], key=lambda im: im["id"])]
    (root / "val2017" / names[0]).unlink()
    corrupt = root / "val2017" / names[1]
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    with pytest.raises(CorruptFileError, match=rf"{names[1]}: pixel data"):
        COCOInstanceDataModule(str(root), num_workers=0, on_missing="skip")._get("val")[0]
    dm = COCOInstanceDataModule(str(root), num_workers=0, on_missing="skip", on_corrupt="skip", check_files=True)
    with pytest.warns(UserWarning, match=r"skipped 2 item\(s\): 1 image file missing .*; 1 corrupt"):
        dm.setup("validate")
    assert dm.skipped["val"]["image_file_missing"] == 1 and dm.skipped["val"]["corrupt"] == 1
    assert len(dm.datasets["val"]) == len(names) - 2
    images, _ = next(iter(dm.val_dataloader()))
    assert len(images) == 1


def test_coco_loader_settings(coco_root):
    dm = COCOInstanceDataModule(str(coco_root), num_workers=1, pin_memory=True, persistent_workers=False,
                                prefetch_factor=3)
    loader = dm.val_dataloader()
    assert (loader.pin_memory, loader.persistent_workers, loader.prefetch_factor) == (True, False, 3)
