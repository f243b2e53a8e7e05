"""Augmentations (mmseg / detectron2 recipes) and the shared reading helpers."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mamba_dense.datamodules._common import DataError, WorkerSeeded, read_label_png, read_rgb
from mamba_dense.datamodules._volume import intensity_augment, random_flip, sample_patch
from mamba_dense.datamodules.transforms import PhotoMetricDistortion, RandomCropCatMax, RescaleToFit, ResizeShortestEdge


def _run(t, h, w, **extra):
    return A.Compose([t], seed=0)(image=np.zeros((h, w, 3), np.uint8), mask=np.zeros((h, w), np.uint8), **extra)


def test_rescale_to_fit_matches_mmseg():
    assert _run(RescaleToFit((2048, 512)), 512, 683)["image"].shape[:2] == (512, 683)
    assert _run(RescaleToFit((2048, 512)), 364, 500)["image"].shape[:2] == (512, 703)
    assert _run(RescaleToFit((2048, 512)), 1000, 5000)["image"].shape[:2] == (410, 2048)  # long side caps
    for _ in range(20):
        out = _run(RescaleToFit((2048, 512), (0.5, 2.0)), 256, 256)
        assert 256 <= out["image"].shape[0] <= 1024 and out["mask"].shape == out["image"].shape[:2]


def test_random_rescale_rounds_the_scaled_bound_first(monkeypatch):
    """mmcv's RandomResize scales (2048, 512) by the ratio and rounds it down to whole pixels before the
    keep-ratio resize: 683 x 512 at ratio 1.7666 is 1206 x 904 (the unrounded factor gave 1207 x 905)."""
    t = RescaleToFit((2048, 512), (0.5, 2.0))
    monkeypatch.setattr(t.py_random, "uniform", lambda a, b: 1.7666)
    params = t.get_params_dependent_on_data({"shape": (512, 683, 3)}, {})
    long_edge, short_edge = int(2048 * 1.7666), int(512 * 1.7666)
    assert params["factor"] == min(long_edge / 683, short_edge / 512)
    assert (int(512 * params["factor"] + 0.5), int(683 * params["factor"] + 0.5)) == (904, 1206)


def test_photometric_hue_shift_excludes_the_upper_end():
    """mmseg draws np.random.randint(-18, 18): -18..17."""
    t = PhotoMetricDistortion()
    hues = set()
    for seed in range(400):
        t.set_random_seed(seed)
        h = t.get_params()["hue"]
        if h is not None:
            hues.add(h)
    assert min(hues) == -18 and max(hues) == 17
    zero = PhotoMetricDistortion(hue_delta=0)  # an empty range for randint(0, -1)
    for seed in range(20):
        zero.set_random_seed(seed)
        assert zero.get_params()["hue"] in (None, 0)


def test_resize_shortest_edge():
    t = A.Compose([ResizeShortestEdge((640, 800), 1333)], seed=0)
    sizes = {t(image=np.zeros((480, 640, 3), np.uint8))["image"].shape[0] for _ in range(30)}
    assert sizes == {640, 800}
    assert t(image=np.zeros((100, 1000, 3), np.uint8))["image"].shape[:2] == (133, 1333)


def test_cat_max_ratio_crop():
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 70:] = 1  # only ~1/3 of the 50x50 crops have < 75% of class 0

    def balanced_share(cat_max_ratio: float) -> float:
        ratios = []
        for seed in range(40):
            out = A.Compose([RandomCropCatMax(50, 50, cat_max_ratio=cat_max_ratio)], seed=seed)(
                image=np.zeros((100, 100, 3), np.uint8), mask=mask)
            assert out["image"].shape == (50, 50, 3) and out["mask"].shape == (50, 50)
            _, counts = np.unique(out["mask"], return_counts=True)
            ratios.append(counts.max() / counts.sum())
        return float(np.mean(np.array(ratios) < 0.75))

    assert balanced_share(0.75) > 0.9  # up to 10 tries, as in mmseg
    assert balanced_share(1.0) < 0.6  # check disabled: plain random crops
    small = A.Compose([RandomCropCatMax(64, 64)], seed=0)(image=np.zeros((30, 40, 3), np.uint8),
                                                          mask=np.zeros((30, 40), np.uint8))
    assert small["image"].shape == (30, 40, 3)  # never larger than the image: padding comes later


def test_photometric_distortion():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    t = PhotoMetricDistortion(p=1.0)
    assert np.array_equal(t.apply(img), img)  # no step drawn: identity
    out = t.apply(img, brightness=10.0, contrast=1.2, saturation=0.8, hue=5, contrast_first=False)
    assert out.dtype == np.uint8 and out.shape == img.shape and not np.array_equal(out, img)
    a = A.Compose([PhotoMetricDistortion()], seed=3)(image=img)["image"]
    b = A.Compose([PhotoMetricDistortion()], seed=3)(image=img)["image"]
    assert np.array_equal(a, b)
    with pytest.raises(TypeError, match="before A.Normalize"):
        t.apply(img.astype(np.float32))


def _mmseg_photometric(bgr, brightness, contrast_first, contrast, saturation, hue):
    """mmseg's PhotoMetricDistortion.transform on a BGR uint8 image, step by step (each step back
    to uint8, one HSV round trip per HSV step), written from its source."""
    import cv2

    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    img = convert(bgr, beta=brightness)
    if contrast_first:
        img = convert(img, alpha=contrast)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=saturation)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + hue) % 180
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first:
        img = convert(img, alpha=contrast)
    return img


@pytest.mark.parametrize("contrast_first", [True, False])
def test_photometric_distortion_matches_mmseg(contrast_first):
    """Every step returned uint8 in mmseg, and saturation and hue took separate HSV round trips;
    the fused version differed by up to 9 grey levels."""
    rgb = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    params = dict(brightness=-13.7, contrast_first=contrast_first, contrast=1.37, saturation=0.61, hue=-7)
    ours = PhotoMetricDistortion().apply(rgb, **params)
    ref = _mmseg_photometric(rgb[..., ::-1].copy(), **params)[..., ::-1]
    assert np.array_equal(ours, ref)
    with pytest.raises(ValueError, match=r"hue_delta=-1: expected a number in \[0, 180\]"):
        PhotoMetricDistortion(hue_delta=-1)
    with pytest.raises(ValueError, match=r"contrast_range=\(-1, -0\.5\): expected \(low, high\) factors"):
        PhotoMetricDistortion(contrast_range=(-1, -0.5))


def test_gamma_drawn_as_nnunet():
    """batchgenerators' augment_gamma: half the draws from [0.7, 1), half from [1, 1.5] (a uniform
    draw over [0.7, 1.5] brightened only 3 in 8); mean and std kept; the inverted variant too."""
    from mamba_dense.datamodules._volume import _gamma

    x0 = np.random.default_rng(2).normal(size=(6, 7, 8)).astype(np.float32)
    brighter = []
    for seed in range(400):
        x = x0.copy()
        _gamma(x, np.random.default_rng(seed), invert=False)
        assert abs(x.mean() - x0.mean()) < 1e-4 and abs(x.std() - x0.std()) < 1e-4
        brighter.append(np.median(x) > np.median(x0))  # gamma < 1 lifts the middle of the range
    assert 0.42 < np.mean(brighter) < 0.58
    x = x0.copy()
    _gamma(x, np.random.default_rng(0), invert=True)
    assert abs(x.mean() - x0.mean()) < 1e-4 and not np.allclose(x, x0)


class _Draws(WorkerSeeded, Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor(self.rng().random())


def test_workers_draw_different_augmentations():
    draws = torch.cat(list(DataLoader(_Draws(), batch_size=1, num_workers=2)))
    assert len(set(draws.tolist())) == 4  # without reseeding, forked workers would repeat each other


def test_volume_patch_and_flip():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 10, 12, 14)).astype(np.float32)
    label = np.zeros((10, 12, 14), np.int64)
    label[8, 1, 2] = 1
    img_p, lab_p = sample_patch(image, label, (16, 8, 8), rng, {1: np.array([[8, 1, 2]])})
    assert img_p.shape == (2, 16, 8, 8) and lab_p.shape == (16, 8, 8) and lab_p.sum() == 1
    img_f, lab_f = random_flip(img_p, lab_p, rng, p=1.0)
    assert np.array_equal(img_f, img_p[:, ::-1, ::-1, ::-1]) and np.array_equal(lab_f, lab_p[::-1, ::-1, ::-1])
    aug = intensity_augment(img_p, np.random.default_rng(1))
    assert aug.shape == img_p.shape and aug.dtype == np.float32 and np.isfinite(aug).all()


def test_readers(tmp_path):
    Image.fromarray(np.full((4, 5), 7, np.uint8)).convert("P").save(tmp_path / "p.png")
    assert read_label_png(tmp_path / "p.png").shape == (4, 5)
    Image.fromarray(np.full((4, 5), 300, np.uint16)).save(tmp_path / "i16.png")
    assert read_label_png(tmp_path / "i16.png").max() == 300
    Image.new("CMYK", (5, 4)).save(tmp_path / "c.jpg")
    assert read_rgb(tmp_path / "c.jpg").shape == (4, 5, 3)
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"x\.jpg: pixel data: cannot decode"):
        read_rgb(tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError, match="file not found"):
        read_rgb(tmp_path / "absent.jpg")


def test_pipeline_transforms_draw_independently(tmp_path):
    """albumentations' Compose.set_random_seed gives every child the compose's seed: the ADE20K
    flip fired exactly when the rescale ratio was small (and the photometric steps with it), and
    the COCO 3x recipe never flipped at short sides 768 and 800."""
    from mamba_dense.datamodules import ADE20KDataModule, write_ade20k_like
    from mamba_dense.datamodules._common import seed_pipeline

    write_ade20k_like(tmp_path / "ade", num_train=2, num_val=1, num_classes=4, size_range=(40, 60), seed=0)
    t = ADE20KDataModule(str(tmp_path / "ade"), num_classes=4, crop_size=16, scale=(64, 16)).train_transform()
    seed_pipeline(t, 5)
    first = [c.py_random.random() for c in t.transforms]
    assert len(set(first)) == len(first)  # each child its own stream
    draws = np.array([[c.py_random.random() for c in (seed_pipeline(t, seed) or t.transforms)] for seed in range(300)])
    corr = np.corrcoef(draws.T)[np.triu_indices(len(t.transforms), 1)]
    assert np.abs(corr).max() < 0.25, corr  # identical seeds: 1.0
    seed_pipeline(t, 5)
    assert [c.py_random.random() for c in t.transforms] == first  # and reproducible


@pytest.mark.parametrize("make, match", [
    (lambda: RescaleToFit((2048, 512), (0.0, 0.0)), r"ratio_range=\(0\.0, 0\.0\)"),
    (lambda: RescaleToFit((2048, 512), (2.0, 0.5)), r"ratio_range=\(2\.0, 0\.5\): expected \(low, high\)"),
    (lambda: RescaleToFit((0, 16)), r"scale=\(0, 16\): expected 2 positive integers"),
    (lambda: RandomCropCatMax(0, 16), r"crop size \(height, width\)=\(0, 16\)"),
    (lambda: RandomCropCatMax(16, 16, cat_max_ratio=0.0), r"cat_max_ratio=0\.0: expected a number in \(0, 1\]"),
    (lambda: ResizeShortestEdge((), 1333), r"short_sizes=\(\): expected one or more positive integers"),
    (lambda: ResizeShortestEdge((800,), 0), r"max_size=0: expected a positive integer"),
])
def test_transform_arguments_checked(make, match):
    with pytest.raises(ValueError, match=match + r".*Fix: e\.g\."):
        make()


@pytest.mark.parametrize("kind, kw, match", [
    ("ade", {"crop_size": 0}, r"crop_size=0: expected 2 positive integers"),
    ("ade", {"crop_size": (8, 8, 8)}, r"crop_size=\(8, 8, 8\)"),
    ("ade", {"ratio_range": (1.0,)}, r"ratio_range=\(1\.0,\)"),
    ("ade", {"ratio_range": (-1, -0.5)}, r"ratio_range=\(-1, -0\.5\)"),
    ("ade", {"size_divisor": -4}, r"size_divisor=-4: expected a number >= 1"),
    ("ade", {"batch_size": 0}, r"batch_size=0: expected a number >= 1"),
    ("coco", {"min_box_size": 0}, r"min_box_size=0: expected a number > 0"),
    ("coco", {"train_scales": ()}, r"train_scales=\(\): expected one or more positive integers"),
    ("coco", {"hflip_prob": -0.5}, r"hflip_prob=-0\.5: expected a number in \[0, 1\]"),
    ("msd", {"oversample_foreground": -0.5}, r"oversample_foreground=-0\.5: expected a number in \[0, 1\]"),
    ("msd", {"samples_per_volume": 0}, r"samples_per_volume=0: expected a positive integer"),
])
def test_datamodule_augmentation_arguments_checked(tmp_path, kind, kw, match):
    """Bad settings were accepted and failed mid-epoch inside OpenCV / albumentations / numpy, or
    silently trained on nothing (ratio_range=(0, 0): every crop 1 x 1 pixel of ignore label)."""
    from mamba_dense.datamodules import ADE20KDataModule, COCOInstanceDataModule, MedicalDecathlonDataModule

    make = {"ade": ADE20KDataModule, "coco": COCOInstanceDataModule, "msd": MedicalDecathlonDataModule}[kind]
    with pytest.raises(ValueError, match=match + r".*Fix: e\.g\."):
        make(str(tmp_path / "nowhere"), **kw)
