"""Exact resume: a callback that puts back what Lightning leaves out of a resumed `fit` (the global
RNG states; the training loaders' positions when `configure_optimizers` asked for
`estimated_stepping_batches`), and `ckpt_path="last"` across the runs of one log folder.

The data side of an exact resume (same batches, same augmentation) lives with the loaders:
`mamba_dense.datamodules._sampling`.
"""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


def _loaders(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _loaders(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _loaders(v)]
    return [] if obj is None else [obj]


class ExactResume(pl.Callback):
    """Makes a `fit` resumed from a checkpoint continue as the interrupted run would have.

    - RNG: saves the global RNG states (torch CPU and CUDA, NumPy, Python) with every checkpoint and
      puts them back right before the first training batch of the resumed run. Dropout and
      drop-path masks come from torch's global generator, which Lightning neither saves nor
      restores. Restoring at the first batch (not at load time) skips whatever the resumed process
      draws while it starts up; the training loaders of `mamba_dense.datamodules` do not draw from
      the global generator, so the state saved after step k is the one step k + 1 starts from. In
      DDP the checkpoint holds rank 0's states and every rank gets them (with `seed_everything`
      the ranks' states are equal anyway).
    - Loaders: Lightning 2.6 saves the state of every training loader that has
      `state_dict`/`load_state_dict`, but hands it back only if it builds the loaders after the
      restore. A `configure_optimizers` that reads `trainer.estimated_stepping_batches` (all our
      tasks, for the poly schedule) makes it build them before, and the saved position is then
      silently dropped. This callback gives it to the loaders at `on_train_start`, when Lightning
      resumes inside an epoch (it is idempotent when Lightning did it already).

    `mamba-dense` adds it to every run.

    Example:
        >>> trainer = pl.Trainer(callbacks=[ExactResume()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None
        self._loader_states: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # NOTE: plain tensors, ints and lists only, so that `torch.load(weights_only=True)` reads it
        np_state = np.random.get_state()
        version, py_state, gauss = random.getstate()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return {
            "torch": torch.get_rng_state(),
            "cuda": list(cuda),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": version, "state": list(py_state), "gauss": gauss},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states = fit_loop.get("state_dict", {}).get("combined_loader") or None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states, self._loader_states = self._loader_states, None
        if not states or not trainer.fit_loop.restarting:  # as Lightning: only when resuming inside an epoch
            return
        stateful = [dl for dl in _loaders(trainer.train_dataloader)
                    if callable(getattr(dl, "state_dict", None)) and callable(getattr(dl, "load_state_dict", None))]
        if len(stateful) != len(states):
            raise RuntimeError(f"The checkpoint holds the state of {len(states)} training loader(s) but this run has "
                               f"{len(stateful)}. Fix: resume with the datamodule settings of the interrupted run")
        for loader, state in zip(stateful, states):
            loader.load_state_dict(state)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            n = min(len(state["cuda"]), torch.cuda.device_count())
            torch.cuda.set_rng_state_all(state["cuda"][:n])
        npk = state["numpy"]
        np.random.set_state(("MT19937", npk["keys"].numpy().astype(np.uint32), npk["pos"], npk["has_gauss"],
                             npk["cached_gaussian"]))
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def find_last_checkpoint(trainer: pl.Trainer) -> str | None:
    """Newest `last*.ckpt` (by modification time) where this trainer's `ModelCheckpoint`s save, looking
    in every version folder of the first logger (`<save_dir>/<name>/*/checkpoints`), not only in
    this run's new one; None when there is none.

    Lightning's own `ckpt_path="last"` looks only in the new run's folder (`version_<N+1>`), which
    is empty, and then starts from scratch with a warning.
    """
    folders: set[str] = set()
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.dirpath is not None:
            folders.add(os.fspath(cb.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            runs = [glob.escape(os.fspath(save_dir))] + ([glob.escape(str(logger.name))] if logger.name else [])
            folders.update(glob.glob(os.path.join(*runs, "*", "checkpoints")))
        else:
            folders.add(os.path.join(trainer.default_root_dir, "checkpoints"))
    return newest_last_checkpoint(folders)


def newest_last_checkpoint(folders: Iterable[str]) -> str | None:
    """Newest `last.ckpt` / `last-<n>.ckpt` (by modification time) in these folders, or None."""
    found = [p for d in set(folders) for p in glob.glob(os.path.join(glob.escape(d), "last*.ckpt"))
             if os.path.basename(p) == "last.ckpt" or os.path.basename(p)[len("last"):][:1] == "-"]
    return max(found, key=os.path.getmtime) if found else None
