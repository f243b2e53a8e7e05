"""Test-only callback for `mamba-dense fit` subprocesses (tests/tasks/test_resume.py): records every
training step and validation, and kills its own process with SIGKILL at a chosen point.

One JSON line per training step: {"step", "epoch", "batch_idx", "batch" (sha256 of the batch's images,
masks and names), "loss" (float.hex of the training loss, bit-exact)}, and per validation:
{"val_epoch", "step", "metrics": {name: float.hex}}. Lines are flushed before a kill.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from typing import Any

import lightning.pytorch as pl
import torch


def digest(batch: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in ("image", "mask"):
        h.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
    h.update("|".join(batch["name"]).encode())
    return h.hexdigest()


class StepProbe(pl.Callback):
    """Args:
        path: JSON-lines file to append to.
        kill_at_step: SIGKILL this process when the training step with this global step starts (-1: never).
        kill_in_save_at_step: SIGKILL this process half-way through writing the checkpoint whose
            `global_step` is this (-1: never); the partial bytes are flushed to disk first.
    """

    def __init__(self, path: str, kill_at_step: int = -1, kill_in_save_at_step: int = -1) -> None:
        super().__init__()
        self.path, self.kill_at_step, self.kill_in_save_at_step = path, kill_at_step, kill_in_save_at_step
        self._file: Any = None
        self._step = -1

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.kill_in_save_at_step < 0:
            return
        original, target = torch.save, self.kill_in_save_at_step

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(obj, dict) and obj.get("global_step") == target and hasattr(f, "write"):
                buf = io.BytesIO()
                original(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            original(obj, f, *args, **kwargs)

        torch.save = save

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        if self._step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write({"step": self._step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                     "batch": digest(batch), "loss": float(loss.detach()).hex()})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v).hex() for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        self._write({"val_epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics})
