"""`predict` of SemanticSegmentationTask through a real Trainer on ADE20K-layout files: outputs at
each input's original size, one output per input (dotted names, name clashes)."""

import shutil

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mamba_dense.datamodules import ADE20KDataModule, write_ade20k_like
from mamba_dense.datamodules.ade20k import collate_segmentation
from mamba_dense.tasks import SemanticSegmentationTask
from mamba_dense.tasks.inference import resize_logits


def _task(tmp_path, tiny_encoder):
    torch.manual_seed(0)
    return SemanticSegmentationTask(
        num_classes=4, head="fpn", head_kwargs={"pyramid_channels": 32, "segmentation_channels": 32},
        aux_head=False, predict_dir=str(tmp_path / "pred"), **tiny_encoder,
    )


def _predict(task, tmp_path, **kw):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    return [p for batch in trainer.predict(task, **kw) for p in batch]


def _dm(root, **kw):
    # short side 64 <- 40..72 px images: every image is resized, the batch padded to its largest
    return ADE20KDataModule(str(root), num_workers=0, val_batch_size=3, scale=(256, 64), num_classes=4, **kw)


def test_predict_writes_at_each_inputs_original_size(tmp_path, tiny_encoder):
    root = write_ade20k_like(tmp_path / "ade", num_train=0, num_val=3, size_range=(40, 72), seed=1)
    task = _task(tmp_path, tiny_encoder)
    dm = _dm(tmp_path / "ade")
    paths = _predict(task, tmp_path, datamodule=dm)
    assert len(paths) == 3
    dm.setup("predict")
    batch = collate_segmentation([dm.datasets["predict"][i] for i in range(3)])
    assert len({tuple(s) for s in batch["size"].tolist()}) > 1  # one padded batch of different sizes
    task.eval()
    for i, name in enumerate(batch["name"]):
        with Image.open(root / "images" / "validation" / f"{name}.jpg") as im:
            w, h = im.size
        label = np.asarray(Image.open(tmp_path / "pred" / "labels" / f"{name}.png"))
        assert label.shape == (h, w), f"{name}: label map not at the input's size"
        assert Image.open(tmp_path / "pred" / "overlays" / f"{name}.png").size == (w, h)
        assert batch["orig_size"][i].tolist() == [h, w] != batch["size"][i].tolist()
        # the padding is cropped first, then the logits (not the labels) go back to (h, w)
        vh, vw = batch["size"][i].tolist()
        with torch.no_grad():
            logits = task.inference(batch["image"][i : i + 1, :, :vh, :vw])
        # written as the annotations store them: class k -> k + 1 under reduce_zero_label (0 = "other")
        assert dm.reduce_zero_label
        np.testing.assert_array_equal(label, resize_logits(logits, (h, w)).argmax(1)[0].numpy() + 1)


def test_predict_keeps_dotted_names_apart(tmp_path, tiny_encoder):
    src = write_ade20k_like(tmp_path / "ade", num_train=0, num_val=3, size_range=(40, 56), seed=2)
    root = tmp_path / "dots"
    for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
        (root / kind / "validation").mkdir(parents=True)
        for i in range(3):
            shutil.copy(src / kind / "validation" / f"ADE_val_{i:08d}{suffix}",
                        root / kind / "validation" / f"scan.{i + 1:03d}{suffix}")
    _predict(_task(tmp_path, tiny_encoder), tmp_path, datamodule=_dm(root))
    for kind in ("labels", "overlays"):
        assert sorted(p.name for p in (tmp_path / "pred" / kind).iterdir()) == [
            "scan.001.png", "scan.002.png", "scan.003.png"
        ]


def test_predict_refuses_two_inputs_with_one_output_name(tmp_path, tiny_encoder):
    samples = [
        {"image": torch.randn(3, 64, 64), "mask": torch.zeros(64, 64, dtype=torch.int64), "name": name,
         "size": torch.tensor([64, 64])}
        for name in ("left/x", "right/x")
    ]
    loader = DataLoader(samples, batch_size=1, collate_fn=collate_segmentation)
    with pytest.raises(ValueError, match="'left/x' and 'right/x' would both be written to labels/x.png"):
        _predict(_task(tmp_path, tiny_encoder), tmp_path, dataloaders=loader)


def test_scores_skip_the_distributed_samplers_repeats(tmp_path, tiny_encoder):
    """Lightning's DistributedSampler gives every rank as many samples by repeating the first ones: with 3
    validation images on 2 processes, rank 1 gets image 1 and a repeat of image 0. Scores must skip the
    repeat (2-process validation scored 3.65 mIoU where 1 process scored 4.15; found by an exploratory
    run). Here rank 1's loader runs in one process: its scores equal those of image 1 alone."""
    from torch.utils.data import DistributedSampler, Subset

    from mamba_dense.tasks.callbacks import local_log_dir

    write_ade20k_like(tmp_path / "ade", num_train=0, num_val=3, size_range=(40, 72), seed=1)
    dm = _dm(tmp_path / "ade")
    dm.setup("validate")
    ds = dm.datasets["val"]
    task = _task(tmp_path, tiny_encoder)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path))
    rank1 = DataLoader(ds, batch_size=1, sampler=DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False),
                       collate_fn=collate_segmentation)
    assert [int(i) for i in rank1.sampler] == [1, 0]  # image 1, then the repeat of image 0
    (padded,) = trainer.validate(task, dataloaders=rank1)
    (alone,) = trainer.validate(task, dataloaders=DataLoader(Subset(ds, [1]), batch_size=1,
                                                             collate_fn=collate_segmentation))
    assert padded == pytest.approx(alone)
    assert local_log_dir(trainer) == trainer.log_dir  # the rank-local folder (no collective) is Lightning's


def test_predict_on_images_without_labels(tmp_path, tiny_encoder):
    """ADE20K's test release has images only: predict needed an annotations folder."""
    src = write_ade20k_like(tmp_path / "ade", num_train=0, num_val=3, size_range=(40, 56), seed=3)
    shutil.rmtree(src / "annotations" / "validation")
    dm = _dm(tmp_path / "ade")
    paths = _predict(_task(tmp_path, tiny_encoder), tmp_path, datamodule=dm)
    names = sorted(p.stem for p in (src / "images" / "validation").glob("*.jpg"))
    assert len(paths) == 3
    assert sorted(p.stem for p in (tmp_path / "pred" / "labels").iterdir()) == names
    with pytest.raises(FileNotFoundError, match=r"annotations/validation: split folder not found.*Fix"):
        dm.setup("test")  # scoring still needs the labels
    shutil.rmtree(src / "annotations")  # no annotations folder at all: predict still reads the images
    assert len(_predict(_task(tmp_path, tiny_encoder), tmp_path, datamodule=_dm(tmp_path / "ade"))) == 3
