"""ADE20K semantic segmentation (and any dataset in the same folder layout).

Layout (``root`` may be the folder holding ``ADEChallengeData2016/`` or that folder itself)::

    ADEChallengeData2016/
      images/{training,validation}/*.jpg
      annotations/{training,validation}/*.png     one channel, class index per pixel

Batches are dicts: ``image`` (B, 3, H, W) float32 normalized with ImageNet mean/std,
``mask`` (B, H, W) int64 with 255 = ignore (unlabelled pixels and padding), ``name`` (list of
file stems), ``size`` (B, 2) int64, the (H, W) of the image before padding, and ``orig_size``
(B, 2) int64, its (H, W) on disk (before resizing), so predictions can be written at that size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._ade20k_meta import ADE20K_CLASSES, ADE20K_PALETTE
from ._common import (
    IMAGENET_MEAN, IMAGENET_STD, CorruptFileError, DataError, SkipsCorrupt, WorkerSeeded, check_choice,
    check_number, check_sizes, check_span, default_cache_dir, list_files, make_loader, read_label_png, read_rgb,
    report_skipped,
)
from .synthetic import SHAPE_CLASSES, write_ade20k_like
from .transforms import PhotoMetricDistortion, RandomCropCatMax, RescaleToFit

__all__ = ["ADE20KDataModule", "ShapesDataModule", "SegmentationFolder", "collate_segmentation", "read_class_names"]

IGNORE_INDEX = 255


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file: one name per line, or ADE20K's ``objectInfo150.txt``
    (tab-separated with a ``Idx ... Name`` header; the first synonym of each name is kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: class names file not found. Fix: pass an existing `class_names_file`")
    lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and lines[0].split()[0].lower() == "idx":
        return [ln.split("\t")[-1].split(",")[0].strip() for ln in lines[1:]]
    return [ln.strip() for ln in lines]


def _palette(num_classes: int) -> list[tuple[int, int, int]]:
    if num_classes == len(ADE20K_PALETTE):
        return list(ADE20K_PALETTE)
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes)]


class SegmentationFolder(SkipsCorrupt, WorkerSeeded, Dataset):
    """Image/label pairs from two folders, paired by file stem.

    Args:
        image_dir, label_dir: folders of images and single-channel label PNGs; ``label_dir=None``
            reads images only (to predict), each with an all-ignore mask.
        num_classes: classes after ``reduce_zero_label``.
        reduce_zero_label: file value 0 -> 255 (ignore), k -> k - 1 (ADE20K convention).
        transform: albumentations pipeline on uint8 HWC image + mask, ending in ``A.Normalize``.
        pad_to: pad (H, W) up to at least this size (train crops), or None.
        size_divisor: pad H and W up to a multiple of this (whole-image validation), or None.
        img_suffix, seg_suffix: file endings.
        on_missing: an image without its label file, or a label without its image: "error" lists
            them and raises; "skip" drops them with a warning (counted in ``skipped``).
        on_corrupt: an undecodable image/label: "error" raises naming the file; "skip" warns and
            serves the next readable pair instead (counted in ``corrupt``, per process).
        mask_at_original_size: return the label as on disk (remapped, not resized or padded)
            with the transformed image, for scoring at the original resolution as mmseg does
            (``mask_is_original=True`` in the item).

    Returns (per item):
        dict(image=(3, H, W) float32, mask=(H, W) int64, name=str, size=(2,) int64 before padding,
        orig_size=(2,) int64 on disk).
    """

    def __init__(
        self, image_dir: Path, label_dir: Path | None, num_classes: int, reduce_zero_label: bool,
        transform: A.Compose, pad_to: tuple[int, int] | None = None, size_divisor: int | None = None,
        img_suffix: str = ".jpg", seg_suffix: str = ".png", on_missing: str = "error", on_corrupt: str = "error",
        mask_at_original_size: bool = False,
    ) -> None:
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.mask_at_original_size = mask_at_original_size
        self.transform, self.pad_to, self.size_divisor = transform, pad_to, size_divisor
        self.on_missing = check_choice("on_missing", on_missing, ("error", "skip"))
        self.on_corrupt = check_choice("on_corrupt", on_corrupt, ("error", "skip"))
        self.corrupt = []
        image_dir = Path(image_dir)
        images = {p.name[: -len(img_suffix)]: p for p in list_files(image_dir, [img_suffix])}
        if label_dir is None:
            if not images:
                raise FileNotFoundError(f"{image_dir}: no *{img_suffix} image. Fix: check `root` and `img_suffix`")
            self.skipped = {}
            self.pairs: list[tuple[Path, Path | None]] = [(images[k], None) for k in sorted(images)]
            return
        label_dir = Path(label_dir)
        labels = {p.name[: -len(seg_suffix)]: p for p in list_files(label_dir, [seg_suffix])}
        # NOTE: names are compared case-sensitively after stripping the (case-insensitive) suffix
        no_label = sorted(images.keys() - labels.keys())
        no_image = sorted(labels.keys() - images.keys())
        self.skipped: dict[str, list[str]] = {"image_without_label": [str(images[k]) for k in no_label],
                                              "label_without_image": [str(labels[k]) for k in no_image]}
        if (no_label or no_image) and self.on_missing == "error":
            raise FileNotFoundError(
                f"{len(no_label)} image(s) without a label file (missing: "
                f"{[str(label_dir / (k + seg_suffix)) for k in no_label[:3]]}), {len(no_image)} label file(s) "
                f"without an image (missing: {[str(image_dir / (k + img_suffix)) for k in no_image[:3]]}). Fix: "
                f"restore them, remove the unpaired files, or pass on_missing='skip' (pairs match by name: "
                f"<stem>{img_suffix} in {image_dir} <-> <stem>{seg_suffix} in {label_dir})"
            )
        keys = sorted(images.keys() & labels.keys())
        if not keys:
            raise FileNotFoundError(f"{image_dir}: no *{img_suffix} image with a *{seg_suffix} label in {label_dir}. "
                                    "Fix: check `root`, `img_suffix` and `seg_suffix`")
        self.pairs = [(images[k], labels[k]) for k in keys]

    def check_files(self) -> list[str]:
        """Decode every pair now; corrupt ones are dropped (``on_corrupt="skip"``, counted in
        ``skipped["corrupt"]``) or raise. Returns the corrupt paths."""
        bad, good = [], []
        for img_path, lbl_path in self.pairs:
            try:
                read_rgb(img_path)
                if lbl_path is not None:
                    read_label_png(lbl_path)
                good.append((img_path, lbl_path))
            except CorruptFileError as e:
                if self.on_corrupt != "skip":
                    raise
                bad.append(e.path)
        if bad and not good:
            raise DataError(bad[0], "pixel data", f"all {len(bad)} pair(s) are corrupt", "re-extract the dataset")
        self.pairs = good
        self.skipped["corrupt"] = bad
        return bad

    def __len__(self) -> int:
        return len(self.pairs)

    def _seeded_transforms(self) -> list[Any]:
        return [self.transform]

    def remap(self, label: np.ndarray, path: Path) -> np.ndarray:
        """Raw file values -> int64 train ids with 255 ignore; out-of-range values raise."""
        label = label.astype(np.int64)
        raw_max = self.num_classes if self.reduce_zero_label else self.num_classes - 1
        bad = np.unique(label[(label > raw_max) & (label != IGNORE_INDEX)])
        if bad.size:
            raise DataError(
                path, "pixel values",
                f"label values {bad[:8].tolist()} outside 0..{raw_max} (num_classes={self.num_classes}, "
                f"reduce_zero_label={self.reduce_zero_label})",
                "set `num_classes`/`reduce_zero_label` to match this dataset, or correct the label file",
            )
        if self.reduce_zero_label:
            ignore = (label == 0) | (label == IGNORE_INDEX)
            label = label - 1
            label[ignore] = IGNORE_INDEX
        return label

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw (H, W, 3) uint8 image and remapped (H, W) int64 label, sizes checked."""
        img_path, lbl_path = self.pairs[index]
        if lbl_path is None:  # images only: nothing labelled
            image = read_rgb(img_path)
            return image, np.full(image.shape[:2], IGNORE_INDEX, np.int64)
        image, label = read_rgb(img_path), read_label_png(lbl_path)
        if image.shape[:2] != label.shape[:2]:
            raise DataError(
                lbl_path, "size",
                f"label is {label.shape[1]}x{label.shape[0]} but image {img_path.name} is "
                f"{image.shape[1]}x{image.shape[0]} (WxH)",
                "regenerate the label at the image's resolution (or pair the right files)",
            )
        return image, self.remap(label, lbl_path)

    def _get_item(self, index: int) -> dict[str, Any]:
        self.rng(index)  # seed the augmentation: per sample (training loaders) or once per worker
        image, label = self.load(index)
        orig_size = torch.tensor(image.shape[:2], dtype=torch.int64)
        out = self.transform(image=image, mask=label.astype(np.uint8))
        image, mask = out["image"], out["mask"].astype(np.int64)
        h, w = mask.shape
        th, tw = h, w
        if self.pad_to is not None:
            th, tw = max(th, self.pad_to[0]), max(tw, self.pad_to[1])
        if self.size_divisor:
            d = self.size_divisor
            th, tw = -(-th // d) * d, -(-tw // d) * d
        if (th, tw) != (h, w):  # pad bottom/right: image with 0 (after normalization), mask with ignore
            image = np.pad(image, ((0, th - h), (0, tw - w), (0, 0)))
            mask = np.pad(mask, ((0, th - h), (0, tw - w)), constant_values=IGNORE_INDEX)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "name": self.pairs[index][0].stem,
            "size": torch.tensor([h, w], dtype=torch.int64),
            "orig_size": orig_size,
        }
        if self.mask_at_original_size:
            item["mask"], item["mask_is_original"] = torch.from_numpy(label), True
        return item


def collate_segmentation(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples, padding bottom/right to the largest (H, W) (image 0, mask 255; masks at their
    original size are padded on their own, ``mask_is_original`` marks such a batch); ``orig_size``
    is kept when the samples have it."""
    th = max(b["image"].shape[1] for b in batch)
    tw = max(b["image"].shape[2] for b in batch)
    mh = max(b["mask"].shape[0] for b in batch)
    mw = max(b["mask"].shape[1] for b in batch)
    images = torch.zeros(len(batch), 3, th, tw)
    masks = torch.full((len(batch), mh, mw), IGNORE_INDEX, dtype=torch.int64)
    for i, b in enumerate(batch):
        _, h, w = b["image"].shape
        images[i, :, :h, :w] = b["image"]
        masks[i, : b["mask"].shape[0], : b["mask"].shape[1]] = b["mask"]
    out = {
        "image": images,
        "mask": masks,
        "name": [b["name"] for b in batch],
        "size": torch.stack([b["size"] for b in batch]),
    }
    if all("orig_size" in b for b in batch):
        out["orig_size"] = torch.stack([b["orig_size"] for b in batch])
    if any(b.get("mask_is_original") for b in batch):
        if not all(b.get("mask_is_original") for b in batch) or "orig_size" not in out:
            raise ValueError("collate_segmentation: a batch mixes masks at the original size and resized masks")
        out["mask_is_original"] = True
    return out


def _resolve_root(root: Path, images_only: bool = False) -> Path:
    """The folder holding images/ and annotations/ (or, with ``images_only`` for predict, images/ alone)."""
    for cand in (root / "ADEChallengeData2016", root):
        if (cand / "images").is_dir() and ((cand / "annotations").is_dir() or images_only):
            return cand
    raise FileNotFoundError(
        f"{root}: no ADE20K layout found (looked for ADEChallengeData2016/{{images,annotations}} and "
        f"{{images,annotations}}; predict needs images/<test split> only). Fix: point `root` at the folder that "
        "holds them"
    )


class ADE20KDataModule(L.LightningDataModule):
    """ADE20K (SceneParsing 150) with the mmseg recipe, or any dataset in the same layout.

    Training: ``RescaleToFit(scale, ratio_range)`` (mmseg RandomResize), random crop of
    ``crop_size`` with ``cat_max_ratio``, horizontal flip, photometric distortion, ImageNet
    normalization, padding to the crop (image 0, mask 255). Validation/test: whole images
    rescaled to fit ``scale`` (short side 512 for ADE20K) keeping the ratio, padded bottom/right
    to a multiple of ``size_divisor`` with 255 in the mask, so padding never counts in the metric.
    By default the metric is computed at that resized resolution on nearest-resized labels
    (image and mask of a batch stay aligned, for any training loop); with
    ``eval_at_original_size=True`` (the ADE20K recipes) validation/test masks stay as on disk and
    the task scores at each image's original resolution, logits resized back, as mmseg does
    (on the three ADE20K samples the two differ by about 0.5 mIoU).

    Normalization: ``image = (rgb / 255 - mean) / std`` with ``self.mean``/``self.std`` (ImageNet).

    Args:
        root: folder holding ``ADEChallengeData2016/`` (or that folder itself).
        crop_size: training crop, int or (H, W).
        batch_size: training batch size.
        num_workers: DataLoader workers.
        val_batch_size: validation/test batch size (whole images of different sizes are padded
            to the largest in the batch with ignore labels).
        scale: (long, short) bound of the resize, (2048, 512) for ADE20K.
        ratio_range: random ratio applied to ``scale`` in training.
        cat_max_ratio: max share of one class in a training crop (1.0 disables).
        size_divisor: validation padding multiple.
        eval_at_original_size: validation/test masks at the original size (mmseg's protocol;
            batches then carry ``mask_is_original=True`` and masks no longer align with images).
        num_classes: classes after ``reduce_zero_label`` (150 for ADE20K).
        reduce_zero_label: file value 0 is "other" -> ignored, k -> k - 1.
        class_names_file: names, one per line or ADE20K's ``objectInfo150.txt``; default ADE20K's
            names when ``num_classes == 150``, else ``class_<k>``.
        img_suffix, seg_suffix: file endings of images and labels.
        train_split, val_split, test_split: sub-folder names under images/ and annotations/
            (predict reads the test split's images; its annotations folder may be absent).
        on_missing: "error" (default) lists images without labels and labels without images and
            raises; "skip" drops them with a warning. Counts: ``skipped`` after ``setup``.
        on_corrupt: undecodable JPEG/PNG files: "error" (default) raises naming the file; "skip"
            warns and serves the next readable pair (counted per worker process).
        check_files: decode every file at ``setup`` so corrupt ones are found (and, with
            ``on_corrupt="skip"``, dropped and counted) before training; one full pass over the data.
        pin_memory: pin batches in page-locked memory; None = when CUDA is available.
        persistent_workers: keep workers between epochs; None = whenever ``num_workers > 0``.
        prefetch_factor: batches loaded ahead per worker (None = PyTorch's default, 2).

    Returns:
        Batches ``{"image": (B,3,H,W) float32, "mask": (B,H,W) int64, "name": list[str], "size": (B,2),
        "orig_size": (B,2)}`` (``size`` before padding, ``orig_size`` on disk).

    Example:
        >>> dm = ADE20KDataModule("data/ade", crop_size=512, batch_size=16)  # doctest: +SKIP
        >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str,
        crop_size: int | tuple[int, int] = 512,
        batch_size: int = 16,
        num_workers: int = 4,
        val_batch_size: int = 1,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        size_divisor: int = 32,
        eval_at_original_size: bool = False,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        class_names_file: str | None = None,
        img_suffix: str = ".jpg",
        seg_suffix: str = ".png",
        train_split: str = "training",
        val_split: str = "validation",
        test_split: str = "validation",
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
        if not 0 < num_classes < IGNORE_INDEX:
            raise ValueError(f"num_classes={num_classes}: expected 1..254 (255 is the ignore label). "
                             "Fix: `num_classes`")
        # NOTE: not sent to the logger: Lightning merges the datamodule's and the task's logged
        # hyperparameters and stops the run when a name holds two values (the tasks' own patch_size /
        # size_divisor are the inference window / padding and may differ); the CLI's config.yaml keeps them
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.crop_size = check_sizes("crop_size", crop_size, 2, "512 or (512, 512)")
        self.batch_size = int(check_number("batch_size", batch_size, 1, example="16"))
        self.val_batch_size = int(check_number("val_batch_size", val_batch_size, 1, example="1"))
        self.num_workers = int(check_number("num_workers", num_workers, 0, example="4"))
        self.scale = check_sizes("scale", scale, 2, "(2048, 512)")
        self.ratio_range = check_span("ratio_range", ratio_range, True, "(0.5, 2.0)")
        self.cat_max_ratio = check_number("cat_max_ratio", cat_max_ratio, 0, 1, lo_open=True, example="0.75 (1: no limit)")
        if size_divisor is not None:
            size_divisor = int(check_number("size_divisor", size_divisor, 1, example="32 (or None)"))
        self.size_divisor = size_divisor
        self.eval_at_original_size = bool(eval_at_original_size)
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.img_suffix, self.seg_suffix = img_suffix, seg_suffix
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.ignore_index = IGNORE_INDEX
        self.class_names = self._class_names(class_names_file)
        self.palette = _palette(num_classes)
        self.on_missing, self.on_corrupt, self.check_files = on_missing, on_corrupt, check_files
        self.loader_kwargs = {"pin_memory": pin_memory, "persistent_workers": persistent_workers,
                              "prefetch_factor": prefetch_factor}
        self.datasets: dict[str, SegmentationFolder] = {}

    def _class_names(self, class_names_file: str | None) -> list[str]:
        if class_names_file is None:
            if self.num_classes == len(ADE20K_CLASSES):
                return list(ADE20K_CLASSES)
            return [f"class_{k}" for k in range(self.num_classes)]
        names = read_class_names(class_names_file)
        if len(names) != self.num_classes:
            raise DataError(
                class_names_file, "number of names", f"{len(names)} names for num_classes={self.num_classes}",
                "list exactly one name per class (after reduce_zero_label), or fix `num_classes`",
            )
        return names

    def train_transform(self) -> A.Compose:
        return A.Compose([
            RescaleToFit(self.scale, self.ratio_range),
            RandomCropCatMax(*self.crop_size, cat_max_ratio=self.cat_max_ratio, ignore_index=IGNORE_INDEX),
            A.HorizontalFlip(p=0.5),
            PhotoMetricDistortion(),
            A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0),
        ])

    def eval_transform(self) -> A.Compose:
        return A.Compose([RescaleToFit(self.scale), A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0)])

    def _dataset(self, split: str) -> SegmentationFolder:
        base = _resolve_root(self.root, images_only=split == "predict")
        sub = self.splits["test" if split == "predict" else split]
        train = split == "train"
        # predict reads the test split's images, with or without labels (ADE20K's test release has none)
        images_only = split == "predict" and not (base / "annotations" / sub).is_dir()
        for kind, suffix in (("images", self.img_suffix), ("annotations", self.seg_suffix)):
            if kind == "annotations" and images_only:
                continue
            if not (base / kind / sub).is_dir():
                raise FileNotFoundError(
                    f"{base / kind / sub}: split folder not found. Expected layout: {base}/images/{sub}/*{self.img_suffix}"
                    f" and {base}/annotations/{sub}/*{self.seg_suffix} (found {kind}/: "
                    f"{sorted(p.name for p in (base / kind).iterdir() if p.is_dir())}). Fix: `{split}_split` or `root`"
                )
        return SegmentationFolder(
            base / "images" / sub, None if images_only else base / "annotations" / sub, self.num_classes,
            self.reduce_zero_label,
            self.train_transform() if train else self.eval_transform(),
            pad_to=self.crop_size if train else None, size_divisor=None if train else self.size_divisor,
            img_suffix=self.img_suffix, seg_suffix=self.seg_suffix, on_missing=self.on_missing,
            on_corrupt=self.on_corrupt, mask_at_original_size=self.eval_at_original_size and not train,
        )

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for split in wanted.get(stage or "", ["train", "val", "test"]):
            self._get(split)

    def _get(self, split: str) -> SegmentationFolder:
        if split not in self.datasets:
            ds = self._dataset(split)
            if self.check_files:
                ds.check_files()
            report_skipped(f"ADE20K {split} split ({ds.pairs[0][0].parent})", ds.skipped)
            self.datasets[split] = ds
        return self.datasets[split]

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Items skipped so far per built split and reason, e.g. ``{"train": {"corrupt": 1, ...}}``
        (``corrupt`` adds files found at setup and those skipped in this process while loading)."""
        out = {}
        for split, ds in self.datasets.items():
            counts = {k: len(v) for k, v in ds.skipped.items()}
            counts["corrupt"] = len(set(ds.skipped.get("corrupt", [])) | set(ds.corrupt))
            out[split] = counts
        return out

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        ds = self._get(split)
        return make_loader(ds, batch_size, train, self.num_workers, collate_segmentation,
                           drop_last=train and len(ds) > batch_size, **self.loader_kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        """The test split's images (``test_split``); its annotations folder may be absent."""
        return self._loader("predict", self.val_batch_size, False)


class ShapesDataModule(ADE20KDataModule):
    """The demo dataset: coloured shapes (circle, square, triangle, star) on gradient
    backgrounds, written in the ADE20K layout by ``prepare_data`` and read by the ADE20K reader.

    Five classes: 0 background, 1..4 shapes (``reduce_zero_label=False``). The dataset is
    written once (deterministic for a given ``seed``) into ``root``, default
    ``~/.cache/mamba_dense/datasets/shapes``; an existing one is reused as it is.

    Args:
        root: folder to write/read (``root/ADEChallengeData2016``); None for the cache default.
        crop_size, batch_size, num_workers, val_batch_size: as in ``ADE20KDataModule``.
        num_train, num_val: images written per split.
        seed: seed of the writer.
        pin_memory, persistent_workers: as in ``ADE20KDataModule``.

    Example:
        >>> dm = ShapesDataModule(batch_size=8)
        >>> dm.prepare_data(); dm.setup("fit")
    """

    def __init__(
        self,
        root: str | None = None,
        crop_size: int = 128,
        batch_size: int = 8,
        num_workers: int = 0,
        val_batch_size: int = 4,
        num_train: int = 64,
        num_val: int = 16,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        root = root if root is not None else str(default_cache_dir() / "datasets" / "shapes")
        super().__init__(
            root, crop_size=crop_size, batch_size=batch_size, num_workers=num_workers,
            val_batch_size=val_batch_size, scale=(4 * crop_size, crop_size), num_classes=1 + len(SHAPE_CLASSES),
            reduce_zero_label=False, pin_memory=pin_memory, persistent_workers=persistent_workers,
        )
        self.num_train, self.num_val, self.seed = num_train, num_val, seed
        self.class_names = ["background", *SHAPE_CLASSES]

    def prepare_data(self) -> None:
        write_ade20k_like(self.root, num_train=self.num_train, num_val=self.num_val,
                          num_classes=len(SHAPE_CLASSES), seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # no-op when present; covers `setup` called without `prepare_data`
        super().setup(stage)
