"""ADE20KDataModule / ShapesDataModule on synthetic shapes and the real ADE20K validation samples."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mamba_dense.datamodules import ADE20KDataModule, DataError, ShapesDataModule, read_class_names
from mamba_dense.datamodules._ade20k_meta import ADE20K_CLASSES, ADE20K_PALETTE


def _real_dm(ade_real, **kw) -> ADE20KDataModule:
    # the real sample holds validation images only: use them for every split
    return ADE20KDataModule(str(ade_real), num_workers=0, train_split="validation", **kw)


def test_real_validation_whole_images(ade_real, snap):
    before = snap(ade_real)
    dm = _real_dm(ade_real, val_batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["name"] == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    img, mask, size = batch["image"], batch["mask"], batch["size"]
    assert img.dtype == torch.float32 and mask.dtype == torch.int64
    assert img.shape[0] == 3 and img.shape[1] == 3 and mask.shape == (3, *img.shape[2:])
    assert img.shape[2] % 32 == 0 and img.shape[3] % 32 == 0
    for i, (h, w) in enumerate(size.tolist()):
        assert min(h, w) == 512  # short side resized to 512 (all three fit the 2048 cap)
        assert (mask[i, h:, :] == 255).all() and (mask[i, :, w:] == 255).all()  # padding ignored
        assert (img[i, :, h:, :] == 0).all()
        valid = mask[i, :h, :w]
        assert ((valid >= 0) & (valid < 150) | (valid == 255)).all()
    # first image: 683x512 (WxH) -> 512x683, padded to 512x704
    assert size[0].tolist() == [512, 683]
    assert "mask_is_original" not in batch

    # mmseg's protocol: masks as on disk, padded on their own
    dm = _real_dm(ade_real, val_batch_size=3, eval_at_original_size=True)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask_is_original"] and torch.equal(batch["image"], img) and torch.equal(batch["size"], size)
    for i, (h, w) in enumerate(batch["orig_size"].tolist()):
        label = dm._get("val").load(i)[1]
        assert torch.equal(batch["mask"][i, :h, :w], torch.from_numpy(label))
        assert (batch["mask"][i, h:] == 255).all() and (batch["mask"][i, :, w:] == 255).all()
    assert snap(ade_real) == before


def test_real_reduce_zero_label_remap(ade_real):
    dm = _real_dm(ade_real)
    ds = dm._get("val")
    _, label = ds.load(2)
    raw = np.asarray(Image.open(ade_real / "annotations" / "validation" / "ADE_val_00000003.png")).astype(np.int64)
    assert label.shape == raw.shape and label.dtype == np.int64
    assert (label[raw == 0] == 255).all()
    np.testing.assert_array_equal(label[raw > 0], raw[raw > 0] - 1)
    assert raw.max() == 103 and (label[raw == 103] == 102).all() and label[label != 255].max() == 102


def test_real_train_pipeline(ade_real):
    torch.manual_seed(0)
    dm = _real_dm(ade_real, batch_size=3, crop_size=1024)  # larger than the images: padding
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 1024, 1024) and batch["mask"].shape == (3, 1024, 1024)
    for i, (h, w) in enumerate(batch["size"].tolist()):
        assert h <= 1024 and w <= 1024
        assert (batch["mask"][i, h:, :] == 255).all() and (batch["mask"][i, :, w:] == 255).all()
    dm = _real_dm(ade_real, batch_size=2, crop_size=256)
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (2, 3, 256, 256)
    valid = b["mask"][b["mask"] != 255]
    assert valid.numel() > 0 and valid.max() < 150


def test_class_names_and_palette(ade_real):
    names = read_class_names(ade_real / "objectInfo150.txt")
    assert len(names) == 150 and names[:4] == ["wall", "building", "sky", "floor"]
    assert sum(a != b for a, b in zip(names, ADE20K_CLASSES)) <= 2  # synonyms shortened differently
    dm = _real_dm(ade_real, class_names_file=str(ade_real / "objectInfo150.txt"))
    assert dm.class_names == names and dm.num_classes == 150
    assert len(dm.palette) == len(ADE20K_PALETTE) == 150 and dm.palette[0] == (120, 120, 120)
    assert dm.mean == (0.485, 0.456, 0.406) and dm.std == (0.229, 0.224, 0.225)
    with pytest.raises(DataError, match="num_classes=10"):
        _real_dm(ade_real, num_classes=10, class_names_file=str(ade_real / "objectInfo150.txt"))


def test_label_out_of_range_names_file(ade_real):
    dm = _real_dm(ade_real, num_classes=50)  # the third image holds class 103
    ds = dm._get("val")
    ds.load(0)  # max 18: fine
    with pytest.raises(DataError, match=r"ADE_val_00000003\.png: pixel values.*num_classes=50.*Fix"):
        ds.load(2)


def test_shapes_datamodule(tmp_path, snap):
    dm = ShapesDataModule(root=str(tmp_path / "shapes"), num_train=10, num_val=3, batch_size=4)
    assert dm.num_classes == 5 and dm.class_names == ["background", "circle", "square", "triangle", "star"]
    dm.prepare_data()
    before = snap(tmp_path / "shapes")
    dm.prepare_data()  # second call: nothing rewritten
    dm.setup("fit")
    assert snap(tmp_path / "shapes") == before
    assert len(dm.datasets["train"]) == 10  # the "._" junk file is not an image
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 128, 128) and batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[2] % 32 == 0 and val["size"].min() >= 128
    assert (val["mask"] != 255).float().mean() > 0.5


def test_reduce_zero_label_on_shapes(shapes_root):
    dm = ADE20KDataModule(str(shapes_root), num_classes=4, num_workers=0, crop_size=64)
    raw_dm = ADE20KDataModule(str(shapes_root), num_classes=5, reduce_zero_label=False, num_workers=0)
    ds, raw = dm._get("val"), raw_dm._get("val")
    img, lbl = ds.load(0)
    img_raw, lbl_raw = raw.load(0)
    np.testing.assert_array_equal(img, img_raw)
    np.testing.assert_array_equal(lbl[lbl_raw == 0], 255)
    np.testing.assert_array_equal(lbl[lbl_raw > 0], lbl_raw[lbl_raw > 0] - 1)
    # a grayscale JPEG among the training images is read as RGB
    img0, _ = dm._get("train").load(0)
    assert img0.ndim == 3 and img0.shape[2] == 3 and (img0[..., 0] == img0[..., 1]).all()


def test_augmentation_reproducible(shapes_root):
    def first_batch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        dm = ADE20KDataModule(str(shapes_root), num_classes=4, num_workers=0, crop_size=64, batch_size=2)
        ds = dm._get("train")
        return torch.stack([ds[0]["image"], ds[1]["image"]])

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst / "ADEChallengeData2016"


def test_bad_inputs(shapes_root, tmp_path, snap):
    before = snap(shapes_root)
    base = _copy(shapes_root, tmp_path / "bad")
    ann = base / "annotations" / "validation"
    img = base / "images" / "validation"
    dm = lambda: ADE20KDataModule(str(tmp_path / "bad"), num_classes=4, num_workers=0)  # noqa: E731

    # corrupt (truncated) PNG
    data = (ann / "ADE_val_00000000.png").read_bytes()
    (ann / "ADE_val_00000000.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"ADE_val_00000000\.png: pixel data: cannot decode.*Fix"):
        dm()._get("val")[0]
    # image/label size mismatch
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(ann / "ADE_val_00000001.png")
    with pytest.raises(DataError, match=r"ADE_val_00000001\.png: size: label is 12x10"):
        dm()._get("val")[1]
    # colour-coded label
    w, h = Image.open(img / "ADE_val_00000002.jpg").size
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 3
    Image.fromarray(rgb).save(ann / "ADE_val_00000002.png")
    with pytest.raises(DataError, match="image mode.*colour label"):
        dm()._get("val")[2]
    # a missing label is reported when the split is built
    (ann / "ADE_val_00000003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_val_00000003\.png.*Fix"):
        dm()._get("val")
    # wrong root
    with pytest.raises(FileNotFoundError, match="no ADE20K layout.*Fix"):
        ADE20KDataModule(str(tmp_path / "nowhere"))._get("val")
    with pytest.raises(ValueError, match="num_classes=255"):
        ADE20KDataModule(str(tmp_path / "bad"), num_classes=255)
    assert snap(shapes_root) == before


def test_lightning_fast_dev_run(shapes_root):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Conv2d(3, 5, 1)

        def _loss(self, batch):
            return torch.nn.functional.cross_entropy(self.head(batch["image"]), batch["mask"], ignore_index=255)

        def training_step(self, batch, _):
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch), batch_size=batch["image"].shape[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ADE20KDataModule(str(shapes_root), num_classes=5, reduce_zero_label=False, crop_size=64,
                          scale=(256, 64), batch_size=2, num_workers=0, val_batch_size=2)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.state.finished


def test_missing_split_dir_names_path_and_layout(shapes_root):
    dm = ADE20KDataModule(str(shapes_root), num_classes=4, num_workers=0, val_split="valid")
    with pytest.raises(FileNotFoundError, match=r"images/valid: split folder not found\. Expected layout: .*"
                                                r"images/valid/\*\.jpg and .*annotations/valid/\*\.png.*"
                                                r"found images/: \['training', 'validation'\].*Fix: `val_split`"):
        dm.setup("validate")


def _unpaired(shapes_root, tmp_path):
    base = _copy(shapes_root, tmp_path / "unpaired")
    ann, img = base / "annotations" / "validation", base / "images" / "validation"
    (ann / "ADE_val_00000001.png").unlink()  # image without its label
    shutil.copy(ann / "ADE_val_00000002.png", ann / "ADE_val_00000099.png")  # label without its image
    return tmp_path / "unpaired", img, ann


def test_unpaired_files_listed_then_error(shapes_root, tmp_path):
    root, img, ann = _unpaired(shapes_root, tmp_path)
    dm = ADE20KDataModule(str(root), num_classes=4, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("validate")
    msg = str(err.value)
    assert "1 image(s) without a label file" in msg and str(ann / "ADE_val_00000001.png") in msg
    assert "1 label file(s) without an image" in msg and str(img / "ADE_val_00000099.jpg") in msg
    assert "on_missing='skip'" in msg
    with pytest.raises(ValueError, match=r"on_missing='ignore': expected one of \['error', 'skip'\]"):
        ADE20KDataModule(str(root), on_missing="ignore")


def test_unpaired_files_skipped_with_warning_and_counted(shapes_root, tmp_path, snap):
    root, img, ann = _unpaired(shapes_root, tmp_path)
    before = snap(root)
    dm = ADE20KDataModule(str(root), num_classes=4, num_workers=0, on_missing="skip")
    with pytest.warns(UserWarning, match=r"ADE20K val split .*skipped 2 item\(s\): 1 image without label .*"
                                         r"ADE_val_00000001\.jpg.*1 label without image .*ADE_val_00000099\.png"):
        dm.setup("validate")
    ds = dm.datasets["val"]
    assert [p.stem for p, _ in ds.pairs] == ["ADE_val_00000000", "ADE_val_00000002", "ADE_val_00000003"]
    assert dm.skipped == {"val": {"image_without_label": 1, "label_without_image": 1, "corrupt": 0}}
    assert ds[1]["name"] == "ADE_val_00000002"
    assert snap(root) == before  # skipping never writes


def _corrupt(shapes_root, tmp_path):
    base = _copy(shapes_root, tmp_path / "corrupt")
    img = base / "images" / "validation" / "ADE_val_00000001.jpg"
    lbl = base / "annotations" / "validation" / "ADE_val_00000002.png"
    for p in (img, lbl):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])  # truncated download
    return tmp_path / "corrupt", img, lbl


def test_corrupt_files_raise_by_default_also_in_workers(shapes_root, tmp_path, monkeypatch):
    import gc

    import torch.utils.data._utils as loader_utils

    from mamba_dense.datamodules import CorruptFileError

    # NOTE: a worker that raised takes one status interval (5 s) to be joined; shorten it for the test
    monkeypatch.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)

    root, img, _ = _corrupt(shapes_root, tmp_path)
    dm = ADE20KDataModule(str(root), num_classes=4, num_workers=1, val_batch_size=4, persistent_workers=False)
    with pytest.raises(CorruptFileError, match=r"ADE_val_00000001\.jpg: pixel data: cannot decode.*Fix"):
        dm._get("val")[1]
    # in a DataLoader worker the error reaches the main process, same type, with the file name: never silent
    batches = iter(dm.val_dataloader())
    with pytest.raises(CorruptFileError, match=r"(?s)DataLoader worker.*ADE_val_00000001\.jpg: pixel data"):
        next(batches)
    del batches
    gc.collect()  # join the worker here, while the short interval applies


def test_corrupt_files_skipped_with_warning_and_counted(shapes_root, tmp_path):
    root, img, lbl = _corrupt(shapes_root, tmp_path)
    dm = ADE20KDataModule(str(root), num_classes=4, num_workers=0, on_corrupt="skip", val_batch_size=4)
    dm.setup("validate")  # not checked up front: found while loading
    with pytest.warns(UserWarning, match=r"ADE_val_00000001\.jpg: pixel data.*skipped: on_corrupt='skip'; 1 corrupt"):
        item = dm.datasets["val"][1]
    assert item["name"] == "ADE_val_00000003"  # the next readable pair (ADE_val_00000002.png is corrupt too)
    assert dm.skipped["val"]["corrupt"] == 2
    # check_files: decoded at setup, dropped and reported there
    dm = ADE20KDataModule(str(root), num_classes=4, num_workers=0, on_corrupt="skip", check_files=True,
                          val_batch_size=4)
    with pytest.warns(UserWarning, match=r"skipped 2 item\(s\): 2 corrupt"):
        dm.setup("validate")
    assert dm.skipped["val"] == {"image_without_label": 0, "label_without_image": 0, "corrupt": 2}
    batch = next(iter(dm.val_dataloader()))
    assert batch["name"] == ["ADE_val_00000000", "ADE_val_00000003"]


def test_loader_settings_configurable(shapes_root):
    dm = ADE20KDataModule(str(shapes_root), num_classes=4, num_workers=2, pin_memory=True, persistent_workers=False,
                          prefetch_factor=4, batch_size=2)
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor) == (2, True, False, 4)
    loader = ADE20KDataModule(str(shapes_root), num_classes=4, num_workers=0).val_dataloader()
    assert loader.pin_memory == torch.cuda.is_available() and not loader.persistent_workers
    assert ADE20KDataModule(str(shapes_root), num_classes=4, num_workers=1).val_dataloader().persistent_workers
