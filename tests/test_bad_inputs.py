"""Bad input through the CLI: each error names what is wrong and what would be right."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from mamba_dense.cli import build_cli
from mamba_dense.tasks import SemanticSegmentationTask

pytestmark = [
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended"),
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
]

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "shapes.yaml")
TOY = [
    "--model.init_args.encoder_kwargs={dims: 16, depths: [1, 1, 1, 1]}",
    "--model.init_args.head_kwargs={channels: 16, norm: groupnorm}",
    "--data.init_args.crop_size=64", "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
    "--data.init_args.num_train=2", "--data.init_args.num_val=2",
    "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
]


@pytest.fixture
def demo_args(tmp_path):
    return ["--config", DEMO, *TOY, f"--data.init_args.root={tmp_path / 'shapes'}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}"]


def test_unknown_encoder_lists_the_registered_ones(demo_args):
    with pytest.raises(ValueError, match="Unknown encoder 'vmamba_huge'") as err:
        build_cli([*demo_args, "--model.init_args.encoder=vmamba_huge"], run=False)
    for name in ("vmamba_tiny", "localvmamba_tiny", "himamba_tiny", "mambar_small"):
        assert name in str(err.value)


def test_unknown_head_lists_the_heads(demo_args, capsys):
    with pytest.raises(SystemExit):  # jsonargparse checks the Literal before anything is built
        build_cli([*demo_args, "--model.init_args.head=deeplab"], run=False)
    message = capsys.readouterr().err
    assert "deeplab" in message and "upernet" in message and "fpn" in message


def test_num_classes_disagreeing_with_the_datamodule_names_both(demo_args):
    with pytest.raises(ValueError, match=r"model.num_classes=7 but the datamodule has num_classes=5"):
        build_cli(["fit", *demo_args, "--trainer.fast_dev_run=1", "--model.init_args.num_classes=7"])


def test_checkpoint_of_another_architecture_lists_the_keys(demo_args, tmp_path):
    fit = build_cli(["fit", *demo_args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                     "--trainer.limit_val_batches=1"])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    dm = fit.datamodule
    # NOTE: through the CLI, `--ckpt_path` re-applies the checkpoint's own hyperparameters
    # (LightningCLI), so the model is rebuilt as saved even if the command line says otherwise.
    fpn = ["--model.init_args.head=fpn", "--model.init_args.head_kwargs={pyramid_channels: 16, segmentation_channels: 32}"]
    test = build_cli(["test", *demo_args, *fpn, f"--ckpt_path={ckpt}"])
    assert test.model.hparams.head == "upernet"
    # In Python the model is what the user built: a mismatch names the settings and the keys.
    other = SemanticSegmentationTask(num_classes=5, head="fpn", encoder_kwargs={"dims": 16, "depths": [1, 1, 1, 1]},
                                     head_kwargs={"pyramid_channels": 16, "segmentation_channels": 32})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="another architecture") as err:
        trainer.test(other, dm, ckpt_path=ckpt)
    message = str(err.value)
    assert "'head': ('upernet', 'fpn')" in message
    assert "missing keys" in message and "unexpected keys" in message and "decode_head.psp_" in message
    with pytest.raises(ValueError, match="reshaped") as err:  # same modules, other widths
        SemanticSegmentationTask.load_from_checkpoint(ckpt, encoder_kwargs={"dims": 24, "depths": [1, 1, 1, 1]})
    # the overrides are named (Lightning writes them into the checkpoint's hyper-parameters before the check)
    assert "overridden in load_from_checkpoint: {'encoder_kwargs'" in str(err.value)
    # strict=False leaves missing / unexpected keys to Lightning (it was refused before Lightning could load)
    with pytest.raises(ValueError, match="missing keys.*aux_head"):
        SemanticSegmentationTask.load_from_checkpoint(ckpt, aux_head=True)
    with pytest.warns(UserWarning, match="not in the checkpoint"):
        with_aux = SemanticSegmentationTask.load_from_checkpoint(ckpt, aux_head=True, strict=False)
    assert with_aux.hparams.aux_head


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DDP accepts SyncBatchNorm on GPU modules only")
def test_sync_batchnorm_on_one_process_at_batch_one(demo_args, monkeypatch):
    """The ADE20K recipes set sync_batchnorm: on one device (DDP, world size 1) at batch 1, UPerNet's 1x1 PSP
    map has one value per channel; its norm's fallback was lost in the SyncBatchNorm conversion, and the
    step failed with "Expected more than 1 value per channel"."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    from mamba_dense.tasks.sync_bn import PooledSyncBatchNorm

    calls = []
    forward = PooledSyncBatchNorm.forward
    monkeypatch.setattr(PooledSyncBatchNorm, "forward", lambda self, x: (calls.append(tuple(x.shape)), forward(self, x))[1])
    try:
        cli = build_cli(["fit", *demo_args, "--model.init_args.head_kwargs={channels: 16, norm: batchnorm}",
                         "--data.init_args.batch_size=1", "--trainer.strategy=ddp", "--trainer.devices=1",
                         "--trainer.sync_batchnorm=true", "--trainer.fast_dev_run=1", "--trainer.accelerator=gpu"])
    finally:  # Lightning leaves the NCCL process group: later CPU tests in this worker would all-gather through it
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert (1, 16, 1, 1) in calls  # the pool-1 branch of one image went through the converted norm
