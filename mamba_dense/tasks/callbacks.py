"""Callbacks: prediction overlays of a few validation images, logged every validation epoch."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from .visualize import save_rgb_png


class OverlayLogger(pl.Callback):
    """Logs image | ground truth | prediction strips of the first validation images.

    Works with any task that has `render_overlays(batch, outputs, max_images)` (both of ours).
    With a TensorBoard logger the strips go to `add_image` under "val_overlays/<name>";
    otherwise they are PNG files `<log dir>/overlays/epoch_<E>/<name>.png`.

    Args:
        num_images: how many images per validation epoch.
    """

    def __init__(self, num_images: int = 4) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        self.num_images = num_images
        self._logged = 0
        self.written: list[str] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logged = 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._logged >= self.num_images:
            return
        render = getattr(pl_module, "render_overlays", None)
        if render is None or not isinstance(outputs, dict):
            return
        strips = render(batch, outputs, self.num_images - self._logged)
        self._logged += len(strips)
        epoch = trainer.current_epoch
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        for name, strip in strips:
            if tb is not None:
                tb.experiment.add_image(f"val_overlays/{name}", strip, global_step=trainer.global_step, dataformats="HWC")
            else:
                root = trainer.log_dir or trainer.default_root_dir
                path = os.path.join(root, "overlays", f"epoch_{epoch:03d}", f"{name}.png")
                save_rgb_png(strip, path)
                self.written.append(path)
