"""Callbacks: prediction overlays of a few validation images, logged every validation epoch."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DistributedSampler

from .visualize import save_rgb_png


def local_log_dir(trainer: pl.Trainer) -> str:
    """``trainer.log_dir`` without its broadcast, for code that runs on one rank only: that property is a
    collective (Lightning 2.x), so rank 0 alone calling it waits forever for the others (a 2-process fit
    hung at its first validation batch). Same rule: the first logger's log_dir (save_dir for other
    loggers), else default_root_dir."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        path = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if path:
            return path
    return trainer.default_root_dir


def is_sampler_padding(trainer: pl.Trainer, seen: int, dataloader_idx: int = 0) -> bool:
    """Whether this rank's ``seen``-th evaluation sample of the epoch (0-based) is a repeat that Lightning's
    DistributedSampler added so that every rank gets as many samples: it pads the index list by repeating
    its start and deals position rank + k * world to rank. Scores must skip those, or they count some
    samples twice whenever the dataset size is not a multiple of the number of processes."""
    loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.shuffle or sampler.drop_last:
        return False
    return sampler.rank + seen * sampler.num_replicas >= len(sampler.dataset)


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
                path = os.path.join(local_log_dir(trainer), "overlays", f"epoch_{epoch:03d}", f"{name}.png")
                save_rgb_png(strip, path)
                self.written.append(path)
