"""LightningModules for dense prediction, their inference helpers, metrics and callbacks."""

from ._encoder import ConfigError
from .callbacks import OverlayLogger
from .guards import AtomicCheckpointIO, NonFiniteGuard, OutOfMemoryGuard
from .inference import sliding_window_inference
from .instance import InstanceSegmentationTask
from .metrics import COCOEvaluator, segmentation_scores
from .resume import ExactResume
from .semantic import SemanticSegmentationTask
from .volumetric import VolumetricSegmentationTask

__all__ = [
    "AtomicCheckpointIO",
    "COCOEvaluator",
    "ConfigError",
    "ExactResume",
    "InstanceSegmentationTask",
    "NonFiniteGuard",
    "OutOfMemoryGuard",
    "OverlayLogger",
    "SemanticSegmentationTask",
    "segmentation_scores",
    "sliding_window_inference",
    "VolumetricSegmentationTask",
]
