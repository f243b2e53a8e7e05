"""The task examples run (smoke runs, in-process, at toy size)."""

import runpy
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from PIL import Image

from mamba_dense.tasks import SemanticSegmentationTask

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example_main(name: str):
    return runpy.run_path(str(EXAMPLES / name))["main"]


def test_train_shapes_example(tmp_path):
    task = example_main("train_shapes.py")(["--fast-dev-run", "--root", str(tmp_path / "shapes"), "--out", str(tmp_path / "run")])
    assert list((tmp_path / "run" / "predictions" / "labels").glob("*.png"))
    assert "test" in task.scores


def test_segment_large_image_example(tmp_path):
    labels = example_main("segment_large_image.py")(["--demo", "--out", str(tmp_path), "--window", "256", "--stride", "192"])
    assert labels.shape == (300, 420)  # 2 x 2 overlapping windows
    assert Image.open(tmp_path / "demo_labels.png").size == (420, 300)

    # from a checkpoint, as after `mamba-dense fit`; the pretraining file is not needed any more
    task = SemanticSegmentationTask(num_classes=3, encoder="vmamba_tiny", head="fpn", aux_head=False,
                                    encoder_kwargs={"dims": 16, "depths": [1, 1, 1, 1]},
                                    head_kwargs={"pyramid_channels": 32, "segmentation_channels": 32})
    trainer = pl.Trainer(logger=False, accelerator="cpu")
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    Image.fromarray(np.full((90, 130, 3), 120, np.uint8)).save(tmp_path / "img.png")
    labels = example_main("segment_large_image.py")([
        "--ckpt", str(tmp_path / "task.ckpt"), "--image", str(tmp_path / "img.png"), "--out", str(tmp_path),
        "--window", "64", "--stride", "48",
    ])
    assert labels.shape == (90, 130) and labels.max() < 3
