"""LightningDataModules for dense prediction: ADE20K, COCO instances, MSD volumes, and
synthetic datasets written in the same on-disk formats (for demos and tests).

Conventions: 2D semantic batches carry ImageNet-normalized float images (B, 3, H, W) and int64
masks (B, H, W) with 255 = ignore; COCO batches are torchvision Mask R-CNN lists with images
in [0, 1]; volume batches are (B, C, D, H, W) images and (B, D, H, W) int64 labels. Dataset
folders are only ever read.
"""

from ._common import IMAGENET_MEAN, IMAGENET_STD, DataError
from .ade20k import ADE20KDataModule, SegmentationFolder, ShapesDataModule, collate_segmentation, read_class_names
from .coco import COCOInstanceDataModule, CocoInstances, SyntheticCOCODataModule, collate_detection, load_coco
from .medical import (
    MedicalDecathlonDataModule, PatchDataset, SyntheticVolumesDataModule, VolumeDataset, parse_dataset_json,
    save_prediction,
)
from .synthetic import write_ade20k_like, write_coco_like, write_msd_like

__all__ = [
    "ADE20KDataModule",
    "COCOInstanceDataModule",
    "CocoInstances",
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
