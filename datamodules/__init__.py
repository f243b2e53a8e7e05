"""LightningDataModules for dense prediction: ADE20K, COCO instances, MSD volumes, and
synthetic datasets written in the same on-disk formats (for demos and tests).

Conventions: 2D semantic batches carry ImageNet-normalized float images (B, 3, H, W) and int64
masks (B, H, W) with 255 = ignore; COCO batches are torchvision Mask R-CNN lists with images
in [0, 1]; volume batches are (B, C, D, H, W) images and (B, D, H, W) int64 labels. Dataset
folders are only ever read.
"""

import importlib
import os
from typing import Any

# Nothing may reach the network at run time: albumentations otherwise checks PyPI for a newer
# version on import (a DNS lookup and a warning on offline machines).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Public name -> submodule. Loaded on first use (PEP 562), so that e.g. the volume datamodules
# import without the 2D stack (albumentations, pycocotools) and vice versa.
_EXPORTS = {
    "IMAGENET_MEAN": "_common", "IMAGENET_STD": "_common", "DataError": "_common",
    "CorruptFileError": "_common",
    "ADE20KDataModule": "ade20k", "SegmentationFolder": "ade20k", "ShapesDataModule": "ade20k",
    "collate_segmentation": "ade20k", "read_class_names": "ade20k",
    "COCOInstanceDataModule": "coco", "CocoInstances": "coco", "SyntheticCOCODataModule": "coco",
    "collate_detection": "coco", "load_coco": "coco",
    "MedicalDecathlonDataModule": "medical", "PatchDataset": "medical", "SyntheticVolumesDataModule": "medical",
    "VolumeDataset": "medical", "parse_dataset_json": "medical", "save_prediction": "medical",
    "write_ade20k_like": "synthetic", "write_coco_like": "synthetic", "write_msd_like": "synthetic",
}


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


def load_all() -> None:
    """Import every datamodule (LightningCLI's short class names need them imported)."""
    for mod in sorted(set(_EXPORTS.values())):
        importlib.import_module(f"{__name__}.{mod}")


__all__ = [
    "ADE20KDataModule",
    "COCOInstanceDataModule",
    "CocoInstances",
    "CorruptFileError",
    "DataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MedicalDecathlonDataModule",
    "PatchDataset",
    "SegmentationFolder",
    "ShapesDataModule",
    "SyntheticCOCODataModule",
    "SyntheticVolumesDataModule",
    "VolumeDataset",
    "collate_detection",
    "collate_segmentation",
    "load_coco",
    "parse_dataset_json",
    "read_class_names",
    "save_prediction",
    "write_ade20k_like",
    "write_coco_like",
    "write_msd_like",
]
