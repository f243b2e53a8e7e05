"""InstanceSegmentationTask: real Trainer on the synthetic COCO files, COCOeval, predict outputs."""

import json

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from mamba_dense.datamodules.coco import SyntheticCOCODataModule
from mamba_dense.tasks import InstanceSegmentationTask, OverlayLogger

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _task(tiny_encoder, small_rcnn, **kw):
    return InstanceSegmentationTask(num_classes=4, fpn_channels=32, maskrcnn_kwargs=small_rcnn, **tiny_encoder, **kw)


def test_fit_validate_predict_on_synthetic_coco(tmp_path, tiny_encoder, small_rcnn):
    dm = SyntheticCOCODataModule(root=str(tmp_path / "coco"), batch_size=2, val_batch_size=1, num_train=4, num_val=3)
    task = _task(tiny_encoder, small_rcnn, predict_dir=str(tmp_path / "pred"))
    overlays = OverlayLogger(num_images=2)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[overlays],
    )
    trainer.fit(task, dm)
    # the model resizes as the datamodule says (it did not resize itself), once
    assert tuple(task.model.transform.min_size) == (128, 144, 160) and task.model.transform.max_size == 256
    assert {"bbox_AP", "bbox_AP50", "segm_AP", "segm_APl"} <= set(task.coco_metrics)
    assert all(0.0 <= v <= 1.0 or v == -1.0 for v in task.coco_metrics.values())
    assert len(overlays.written) == 2 and Image.open(overlays.written[0]).mode == "RGB"

    paths = [p for batch in trainer.predict(task, dm) for p in batch]
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["5000.png", "5001.png", "5002.png"]
    info = dm.coco_gt("test").imgs[5000]
    assert Image.open(paths[0]).size == (info["width"], info["height"])
    results = json.loads((tmp_path / "pred" / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3, 7, 9}  # original COCO ids
    assert {r["image_id"] for r in results} <= {5000, 5001, 5002}
    assert {"bbox", "score", "segmentation"} <= set(results[0])


def test_num_classes_must_match_datamodule(tmp_path, tiny_encoder):
    dm = SyntheticCOCODataModule(root=str(tmp_path / "coco"), num_train=2, num_val=2)
    task = InstanceSegmentationTask(num_classes=80, fpn_channels=32, **tiny_encoder)
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", enable_progress_bar=False)
    with pytest.raises(ValueError, match="num_classes=80 but the datamodule has 4"):
        trainer.validate(task, dm)


def test_input_checks(tiny_encoder, small_rcnn):
    task = _task(tiny_encoder, small_rcnn).train()
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 8:40, 8:40] = 1
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([0]), "masks": mask,
              "image_id": torch.tensor(1), "iscrowd": torch.tensor([0])}
    with pytest.raises(ValueError, match="background"):
        task.training_step(([torch.rand(3, 64, 64)], [target]), 1)
    with pytest.raises(ValueError, match="image_std"):
        task.training_step(([torch.randn(3, 64, 64) * 2], [dict(target, labels=torch.tensor([1]))]), 0)
    # crowd regions and degenerate boxes are dropped before torchvision sees them
    crowd = dict(target, labels=torch.tensor([1, 2]), iscrowd=torch.tensor([0, 1]),
                 boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 64.0, 64.0]]), masks=mask.repeat(2, 1, 1))
    loss = task.training_step(([torch.rand(3, 64, 64)], [crowd]), 1)
    loss.backward()
    assert torch.isfinite(loss)
    good = dict(target, labels=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"masks must be \(N, H, W\).*image \(3, 64, 64\), masks \(1, 32, 32\)"):
        task.training_step(([torch.rand(3, 64, 64)], [dict(good, masks=mask[:, :32, :32])]), 1)
    with pytest.raises(ValueError, match=r"boxes must be \(N, 4\)"):
        task.training_step(([torch.rand(3, 64, 64)], [dict(good, boxes=torch.zeros(4))]), 1)
    # 0/255 and soft masks reach torchvision's mask loss as 0/1
    ref = task._train_target(good, torch.rand(3, 64, 64))["masks"]
    assert ref.dtype == torch.uint8 and int(ref.max()) == 1
    for variant in (mask * 255, mask.float() * 0.9, mask.bool()):
        assert torch.equal(task._train_target(dict(good, masks=variant), torch.rand(3, 64, 64))["masks"], ref)


def test_resize_arguments_in_maskrcnn_kwargs_are_refused(tiny_encoder, small_rcnn):
    """They used to be accepted and then replaced by the task's own transform, silently."""
    with pytest.raises(ValueError, match=r"\['max_size', 'min_size'\].*resize_max_size', 'resize_min_size'"):
        _task(tiny_encoder, dict(small_rcnn, min_size=64, max_size=96))


def test_max_steps_only_and_predict_without_targets(tmp_path, tiny_encoder, small_rcnn):
    """`max_steps` without `max_epochs` (iteration-based runs) failed with "the train dataloader
    needs a length"; image-only predict batches reused ids (batch_idx * len(batch) + i, so a
    shorter last batch overwrote an earlier overlay); with resize=True the overlays were drawn at
    the resized size."""
    dm = SyntheticCOCODataModule(root=str(tmp_path / "coco"), batch_size=2, val_batch_size=2, num_train=4, num_val=3,
                                 resize=True)
    task = _task(tiny_encoder, small_rcnn, predict_dir=str(tmp_path / "pred"))
    trainer = pl.Trainer(max_epochs=-1, max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(task, dm)
    assert trainer.global_step == 1

    paths = [p for batch in trainer.predict(task, dm) for p in batch]
    for path in paths:  # drawn at each image's size on disk, though the datamodule resized it
        info = dm.coco_gt("test").imgs[int(path.rsplit("/", 1)[-1][:-4])]
        assert Image.open(path).size == (info["width"], info["height"])

    images = [img for batch, _ in dm.predict_dataloader() for img in batch]  # 3 images: batches of 2 and 1
    loader = torch.utils.data.DataLoader(images, batch_size=2, collate_fn=list)
    task._predict_dir = str(tmp_path / "pred_images_only")
    paths = [p for batch in trainer.predict(task, loader) for p in batch]
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["0.png", "1.png", "2.png"]
    results = json.loads((tmp_path / "pred_images_only" / "coco_results.json").read_text())
    assert {r["image_id"] for r in results} <= {0, 1, 2}


def test_evaluating_twice_gives_the_same_scores(tmp_path, tiny_encoder, small_rcnn):
    """COCOeval rewrote the datamodule's ground truth in place (RLE with bytes counts): the second
    validation (Lightning's sanity check, then epoch 0) failed reading its own annotations."""
    dm = SyntheticCOCODataModule(root=str(tmp_path / "coco"), val_batch_size=2, num_train=2, num_val=3)
    task = _task(tiny_encoder, small_rcnn)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    first = dict(trainer.validate(task, dm, verbose=False)[0])
    second = dict(trainer.validate(task, dm, verbose=False)[0])
    assert first == second and "val/segm_AP" in first
    gt = dm.coco_gt("val")
    assert all(isinstance(a["segmentation"], (list, dict)) and "ignore" not in a for a in gt.anns.values())
    assert not any(isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], bytes)
                   for a in gt.anns.values())
