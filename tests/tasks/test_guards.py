"""NonFiniteGuard stops a NaN run with a diagnosis; OutOfMemoryGuard explains an OOM; AtomicCheckpointIO never
leaves a partial checkpoint."""

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mamba_dense.cli import build_cli
from mamba_dense.tasks import AtomicCheckpointIO, NonFiniteGuard, OutOfMemoryGuard

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
    assert "loss = nan" in msg and "parameter layer" not in msg  # stopped before the NaN reached the weights
    assert path in msg and guard.checkpoint_path == path and "before this step" in msg
    assert "learning rate" in msg and "bf16" in msg and "gradient_clip_val" in msg
    ckpt = torch.load(path, weights_only=False)
    # the weights that gave the NaN loss (its update was never applied): finite, reloadable to debug
    assert ckpt["global_step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["nonfinite-step3.ckpt"]  # no temp files left


class NaNInputAtStep(NaNAtStep):
    """A batch norm before the layer; at `nan_step` a NaN input reaches it, so its forward updates the
    running statistics with NaN before the loss is checked."""

    def __init__(self, nan_step: int) -> None:
        super().__init__(nan_step)
        self.norm = torch.nn.BatchNorm1d(2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.nan_step:
            x = x.clone()
            x[0, 0] = float("nan")
        return torch.nn.functional.mse_loss(self.layer(self.norm(x)), y)


def test_guard_checkpoint_has_the_running_statistics_from_before_the_bad_forward(tmp_path):
    """The debug checkpoint held NaN running means: the bad forward had updated them."""
    data = DataLoader(TensorDataset(torch.randn(16, 2), torch.randn(16, 1)), batch_size=4)
    guard, model = NonFiniteGuard(), NaNInputAtStep(nan_step=2)
    with pytest.raises(RuntimeError, match="loss = nan"):
        _trainer(tmp_path, callbacks=[guard]).fit(model, data)
    ckpt = torch.load(guard.checkpoint_path, weights_only=False)
    stats = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("norm.")}
    assert all(torch.isfinite(v.double()).all() for v in stats.values())
    assert int(stats["norm.num_batches_tracked"]) == 2  # the two good steps, not the bad one
    assert torch.isfinite(model.norm.running_mean).all()  # put back in the live model, then saved


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


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")
def test_out_of_memory_in_training_names_the_batch_and_the_fixes(tmp_path, monkeypatch):
    from mamba_dense.tasks._encoder import Encoder

    monkeypatch.setattr(Encoder, "forward", _oom)  # the real CLI, trainer and task; the encoder "runs out"
    with pytest.raises(torch.OutOfMemoryError) as err:
        build_cli([
            "fit", "--config", str(CONFIGS / "demo" / "shapes.yaml"),
            "--model.init_args.encoder_kwargs={dims: 16, depths: [1, 1, 1, 1]}",
            "--model.init_args.head_kwargs={channels: 16, norm: groupnorm}",
            "--data.init_args.crop_size=64", "--data.init_args.batch_size=2", "--data.init_args.num_train=4",
            "--data.init_args.num_val=2", f"--data.init_args.root={tmp_path / 'shapes'}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.max_steps=2",
            "--trainer.accumulate_grad_batches=2",
        ])
    msg = str(err.value)
    assert msg.startswith("CUDA out of memory. Tried to allocate 2.00 GiB.")  # the original message stays first
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # the demo config's accelerator is "auto"
    assert f"Out of memory in training step 0 (epoch 0, batch 0) on {device}" in msg
    assert "batch of 2 input(s) of 3x64x64 (torch.float32)" in msg
    assert "data batch_size=2, val_batch_size=4, crop_size=(64, 64)" in msg
    assert "precision 32-true" in msg and "accumulate_grad_batches 2" in msg
    assert "`--data.init_args.batch_size 1` with `--trainer.accumulate_grad_batches 4`" in msg
    assert "effective batch of 4" in msg and "`--data.init_args.crop_size ...`, now (64, 64)" in msg
    assert "`--trainer.precision bf16-mixed`" in msg
    assert "`--model.init_args.grad_checkpointing true`" in msg


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")
def test_out_of_memory_in_volume_validation_names_the_patch_and_the_fixes(tmp_path):
    cli = build_cli([
        "--config", str(CONFIGS / "demo" / "volumes.yaml"),
        f"--data.init_args.root={tmp_path / 'task'}", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.num_cases=3", "--data.init_args.shape=[20, 20, 20]",
        "--data.init_args.patch_size=[16, 16, 16]", "--model.init_args.patch_size=[16, 16, 16]",
        "--model.init_args.encoder_kwargs={dims: [8, 16, 16, 16], depths: [1, 1, 1, 1], d_state: 2}",
        "--model.init_args.decoder_channels=[4, 8, 16, 16]", "--trainer.precision=bf16-mixed",
        f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.fast_dev_run=1",
    ], run=False)
    forward = cli.model.encoder.forward
    cli.model.encoder.forward = lambda x: _oom() if not torch.is_grad_enabled() else forward(x)  # validation only
    with pytest.raises(torch.OutOfMemoryError) as err:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    msg = str(err.value)
    assert "Out of memory in validation batch 0 on cpu" in msg
    assert "data batch_size=2, patch_size=(16, 16, 16)" in msg and "precision bf16-mixed" in msg
    assert "`--model.init_args.sw_batch_size 1`" in msg and "`--model.init_args.sw_buffer_device cpu`" in msg
    assert "bf16-mixed`" not in msg  # already in bf16: not suggested again
    assert "batch_size 1` with" not in msg  # training-only advice left out


def test_out_of_memory_guard_leaves_other_errors_alone(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[OutOfMemoryGuard()])
    model = NaNAtStep(nan_step=-1)
    model.training_step = lambda batch, batch_idx: (_ for _ in ()).throw(ValueError("not memory"))
    with pytest.raises(ValueError) as err:
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(4, 2), torch.randn(4, 1)), batch_size=2))
    assert str(err.value) == "not memory"
