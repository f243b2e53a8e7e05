"""NonFiniteGuard stops a NaN run with a diagnosis; AtomicCheckpointIO never leaves a partial checkpoint."""

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mamba_dense.cli import build_cli
from mamba_dense.tasks import AtomicCheckpointIO, NonFiniteGuard

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class NaNAtStep(pl.LightningModule):
    """y = Wx + b regression whose loss becomes NaN at global step `nan_step`."""

    def __init__(self, nan_step: int) -> None:
        super().__init__()
        self.nan_step = nan_step
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.global_step == self.nan_step:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kw,
    )


def test_guard_stops_at_nan_step_with_diagnosis_and_checkpoint(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(16, 2), torch.randn(16, 1)), batch_size=2)
    guard = NonFiniteGuard()
    trainer = _trainer(tmp_path, callbacks=[guard], plugins=[AtomicCheckpointIO()])
    with pytest.raises(RuntimeError) as err:
        trainer.fit(NaNAtStep(nan_step=3), data)
    msg = str(err.value)
    path = str(tmp_path / "nonfinite-step3.ckpt")
    assert "global step 3" in msg and "epoch 0, batch 3" in msg
    assert "loss = nan" in msg and "parameter layer.weight" in msg and "gradient of layer.weight" in msg
    assert path in msg and guard.checkpoint_path == path
    assert "learning rate" in msg and "bf16" in msg and "gradient_clip_val" in msg
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 4 and "layer.weight" in ckpt["state_dict"]  # saved after the NaN update
    assert [p.name for p in tmp_path.iterdir()] == ["nonfinite-step3.ckpt"]  # no temp files left


def test_guard_is_silent_on_finite_losses(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)
    trainer = _trainer(tmp_path, callbacks=[NonFiniteGuard()])
    trainer.fit(NaNAtStep(nan_step=-1), data)
    assert trainer.global_step == 8 and not list(tmp_path.iterdir())


def test_atomic_io_writes_whole_files_and_no_temp_files(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"w": torch.arange(3)}, target)
    io.save_checkpoint({"w": torch.arange(4)}, target)  # overwrite
    assert torch.equal(io.load_checkpoint(target)["w"], torch.arange(4))
    assert os.listdir(target.parent) == ["a.ckpt"]


def test_atomic_io_failed_save_keeps_previous_or_nothing(tmp_path, monkeypatch):
    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    io = AtomicCheckpointIO()
    fresh, existing = tmp_path / "fresh.ckpt", tmp_path / "existing.ckpt"
    io.save_checkpoint({"w": torch.ones(2)}, existing)
    monkeypatch.setattr(torch, "save", partial_save)
    for target in (fresh, existing):
        with pytest.raises(OSError, match="disk full"):
            io.save_checkpoint({"w": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert not fresh.exists()
    assert torch.equal(io.load_checkpoint(existing)["w"], torch.ones(2))  # the previous complete file
    assert os.listdir(tmp_path) == ["existing.ckpt"]  # no temp files


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")
def test_cli_fit_has_guard_and_atomic_io_by_default(tmp_path):
    cli = build_cli([
        "fit", "--config", str(CONFIGS / "demo" / "shapes.yaml"),
        "--model.init_args.encoder_kwargs={dims: 16, depths: [1, 1, 1, 1]}",
        "--model.init_args.head_kwargs={channels: 16, norm: groupnorm}",
        "--data.init_args.crop_size=64", "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
        "--data.init_args.num_train=4", "--data.init_args.num_val=2",
        f"--data.init_args.root={tmp_path / 'shapes'}", f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.fast_dev_run=1",
    ])
    kinds = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert kinds.count("NonFiniteGuard") == 1 and "OverlayLogger" in kinds  # configured callbacks kept
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert cli.trainer.global_step == 1
