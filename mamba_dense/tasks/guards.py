"""Training guards: stop on a non-finite loss with a diagnosis, and write checkpoints atomically."""

from __future__ import annotations

import os
import uuid
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

FIXES = (
    "lower the learning rate (or lengthen the warmup), train in bf16 (`--trainer.precision=bf16-mixed`) "
    "instead of fp16, or clip gradients (`--trainer.gradient_clip_val=1.0`)"
)


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


def first_nonfinite(module: torch.nn.Module) -> list[str]:
    """Names of the first non-finite parameter and of the first non-finite gradient (either may be absent)."""
    found: dict[str, str] = {}
    for name, p in module.named_parameters():
        if "parameter" not in found and not torch.isfinite(p.detach()).all():
            found["parameter"] = f"parameter {name}"
        if "gradient" not in found and p.grad is not None and not torch.isfinite(p.grad).all():
            found["gradient"] = f"gradient of {name}"
        if len(found) == 2:
            break
    return list(found.values())


class NonFiniteGuard(pl.Callback):
    """Stops training at the first NaN/inf training loss, after saving a checkpoint to debug from.

    After each training batch the loss returned by `training_step` is checked (any rank, in
    distributed runs). When it is NaN or inf the guard saves `<log dir>/nonfinite-step<S>.ckpt`,
    looks for the first non-finite parameter and gradient by name, and raises a RuntimeError
    naming the step, epoch, batch, offending tensors and checkpoint, with fixes to try.
    `mamba-dense` adds it to every run.

    Example:
        >>> trainer = pl.Trainer(callbacks=[NonFiniteGuard()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._step = 0
        self.checkpoint_path: str | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # NOTE: global_step is already incremented in on_train_batch_end

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _loss_of(outputs)
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        root = trainer.log_dir or trainer.default_root_dir
        path = os.path.join(root, f"nonfinite-step{self._step}.ckpt")
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        culprits = [f"loss = {loss.item()}" if bad else "loss on another rank"] + first_nonfinite(pl_module)
        raise RuntimeError(
            f"Non-finite training loss at global step {self._step} (epoch {trainer.current_epoch}, "
            f"batch {batch_idx}): {', '.join(culprits)}. Checkpoint saved to {path}. "
            f"To fix: {FIXES}."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that never leaves a truncated checkpoint under the final name.

    Local checkpoints are written to a temporary file in the target directory, fsynced, then
    `os.replace`d onto the target; a kill or an error while saving leaves the previous file (or
    none). Remote (fsspec) paths fall back to `TorchCheckpointIO`. `mamba-dense` uses it unless
    the config gives its own CheckpointIO plugin.

    Example:
        >>> trainer = pl.Trainer(plugins=[AtomicCheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support `storage_options`.")
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # NOTE: same directory, so os.replace is a rename within one filesystem (atomic on POSIX)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
