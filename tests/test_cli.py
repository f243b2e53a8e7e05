"""`mamba-dense` LightningCLI in-process: fit / validate / test / predict on the demo configs."""

import glob
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mamba_dense.cli import build_cli

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = str(CONFIGS / "demo" / "shapes.yaml")
# the demo recipe at toy size, so that each command runs in seconds
SMALL = [
    "--model.init_args.encoder_kwargs={dims: 16, depths: [1, 1, 1, 1]}",
    "--model.init_args.head_kwargs={pyramid_channels: 32, segmentation_channels: 32}",
    "--data.init_args.crop_size=64",
    "--data.init_args.batch_size=2",
    "--data.init_args.val_batch_size=2",
    "--data.init_args.num_train=8",
    "--data.init_args.num_val=2",
]


@pytest.fixture
def shapes_args(tmp_path):
    root = tmp_path / "shapes"
    return [
        "--config", DEMO, *SMALL,
        f"--data.init_args.root={root}",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ]


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_demo_config_fast_dev_run(command, shapes_args, tmp_path):
    out = tmp_path / "pred"
    cli = build_cli([command, *shapes_args, "--trainer.fast_dev_run=1", f"--model.init_args.predict_dir={out}"])
    assert type(cli.model).__name__ == "SemanticSegmentationTask"
    assert type(cli.datamodule).__name__ == "ShapesDataModule"
    if command in ("validate", "test"):
        assert f"{command[:4] if command == 'test' else 'val'}/mIoU" in cli.trainer.callback_metrics
    if command == "predict":
        labels = sorted(glob.glob(str(out / "labels" / "*.png")))
        assert labels and len(glob.glob(str(out / "overlays" / "*.png"))) == len(labels)
        values = np.asarray(Image.open(labels[0]))
        assert values.ndim == 2 and values.max() < 5


def test_fit_then_predict_from_checkpoint(shapes_args, tmp_path):
    fit = build_cli([
        "fit", *shapes_args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
    ])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert ckpt and os.path.isfile(ckpt)
    assert "val/mIoU" in fit.trainer.callback_metrics
    log_dir = fit.trainer.log_dir
    assert os.path.isfile(os.path.join(log_dir, "config.yaml"))
    assert glob.glob(os.path.join(log_dir, "overlays", "epoch_000", "*.png"))  # OverlayLogger (no TensorBoard)
    out = tmp_path / "from_ckpt"
    build_cli(["predict", *shapes_args, f"--ckpt_path={ckpt}", f"--model.init_args.predict_dir={out}"])
    assert len(glob.glob(str(out / "labels" / "*.png"))) == 2


def test_bad_config_values_give_clear_errors(shapes_args):
    with pytest.raises(ValueError, match="datamodule has num_classes=5"):
        build_cli(["validate", *shapes_args, "--trainer.fast_dev_run=1", "--model.init_args.num_classes=7"])
    with pytest.raises(SystemExit):  # jsonargparse rejects values outside the Literal
        build_cli(["fit", *shapes_args, "--model.init_args.head=deeplab"], run=False)


@pytest.mark.parametrize("config", ["ade20k/upernet_vmamba_tiny.yaml", "coco/maskrcnn_vmamba_tiny_1x.yaml", "demo/coco_shapes.yaml"])
def test_recipe_configs_parse(config):
    cli = build_cli(["--config", str(CONFIGS / config), "--trainer.accelerator=cpu", "--trainer.devices=1",
                     "--trainer.strategy=auto", "--trainer.sync_batchnorm=false"], run=False)
    hp = cli.model.hparams
    if "ade20k" in config:
        assert (hp.lr, hp.weight_decay, hp.warmup_iters, hp.head, hp.num_classes) == (6e-5, 0.01, 1500, "upernet", 150)
        assert cli.trainer.max_steps == 160_000 and cli.datamodule.crop_size == (512, 512)
    if "coco/" in config:
        assert (hp.lr, hp.weight_decay, hp.lr_milestones, hp.num_classes) == (1e-4, 0.05, [8, 11], 80)
        assert cli.trainer.max_epochs == 12


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mamba-dense"]
    assert script.value == "mamba_dense.cli:main"
