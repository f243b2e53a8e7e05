"""`mamba-dense`: LightningCLI over our tasks and datamodules.

Examples:
    mamba-dense fit --config configs/demo/shapes.yaml
    mamba-dense test --config configs/ade20k/upernet_vmamba_tiny_512x512_160k.yaml --ckpt_path runs/ade20k/.../last.ckpt
    mamba-dense predict --config configs/demo/shapes.yaml --ckpt_path <ckpt> --model.init_args.predict_dir out/

Models and datamodules are given by class_path (subclass mode), so any LightningModule or
LightningDataModule importable by its dotted path works (`mamba_dense.tasks.SemanticSegmentationTask`,
`mamba_dense.datamodules.ade20k.ShapesDataModule`, ...); classes already imported also resolve by
their short names. Imports come from `lightning.pytorch` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.utilities import rank_zero_info

import mamba_dense.datamodules  # noqa: F401  (classes imported here resolve by short name)
import mamba_dense.tasks  # noqa: F401
from mamba_dense.tasks.guards import AtomicCheckpointIO, NonFiniteGuard, OutOfMemoryGuard
from mamba_dense.tasks.resume import ExactResume, find_last_checkpoint
from mamba_dense.tasks.sync_bn import NoHostSyncBatchNorm

mamba_dense.datamodules.load_all()


class MambaDenseCLI(LightningCLI):
    """LightningCLI with our defaults: configs overwrite their saved copy in the log directory, every run
    has a `NonFiniteGuard`, an `OutOfMemoryGuard` and an `ExactResume` (on top of the configured
    callbacks) and writes checkpoints with `AtomicCheckpointIO` unless the config gives its own
    CheckpointIO plugin. `trainer.sync_batchnorm: true` uses `NoHostSyncBatchNorm` (PyTorch's
    SyncBatchNorm without its host sync per layer) unless the config gives a LayerSync plugin.
    `fit --ckpt_path last` resumes from the newest `last*.ckpt` of any earlier run in the same log
    folder (Lightning alone looks only in the new run's empty version folder)."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        plugins = trainer.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        extra = []
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            extra.append(AtomicCheckpointIO())
        if trainer.get("sync_batchnorm") and not any(isinstance(p, LayerSync) for p in plugins):
            extra.append(NoHostSyncBatchNorm())
        if extra:
            kwargs.setdefault("plugins", [*plugins, *extra])
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            path = find_last_checkpoint(self.trainer)
            if path is not None:
                rank_zero_info(f"Resuming from the newest last checkpoint: {path}")
                config["ckpt_path"] = path


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> MambaDenseCLI:
    """The CLI, parsed from `args` (default sys.argv) and run unless `run=False`; for in-process use."""
    return MambaDenseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # appended to the configured callbacks
        trainer_defaults={"callbacks": [NonFiniteGuard(), OutOfMemoryGuard(), ExactResume()]},
        args=list(args) if args is not None else None,
        run=run,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `mamba-dense` console script."""
    build_cli(args)


if __name__ == "__main__":
    main()
