"""`mamba-dense` LightningCLI in-process: fit / validate / test / predict on the demo configs."""

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mamba_dense.cli import build_cli

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = str(CONFIGS / "demo" / "shapes.yaml")
# the demo recipe at toy size, so that each command runs in seconds
SMALL = [
    "--model.init_args.encoder_kwargs={dims: 16, depths: [1, 1, 1, 1]}",
    "--model.init_args.head_kwargs={channels: 16, norm: groupnorm}",
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
    from mamba_dense.tasks.guards import CheckpointNotFoundError

    # `--ckpt_path last` with no run yet: Lightning alone evaluated the untrained weights
    with pytest.raises(CheckpointNotFoundError, match=r"--ckpt_path last: no last\*\.ckpt .*untrained weights.*Fix"):
        build_cli(["validate", *shapes_args, "--ckpt_path=last", "--trainer.limit_val_batches=1"])
    fit = build_cli([
        "fit", *shapes_args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
    ])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert ckpt and os.path.isfile(ckpt)
    assert "val/mIoU" in fit.trainer.callback_metrics
    log_dir = fit.trainer.log_dir
    assert os.path.isfile(os.path.join(log_dir, "config.yaml"))
    from lightning.pytorch.loggers import TensorBoardLogger

    if isinstance(fit.trainer.logger, TensorBoardLogger):  # Lightning's default where tensorboard is installed
        assert glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))  # OverlayLogger's add_image
    else:
        assert glob.glob(os.path.join(log_dir, "overlays", "epoch_000", "*.png"))  # OverlayLogger's PNGs
    out = tmp_path / "from_ckpt"
    build_cli(["predict", *shapes_args, f"--ckpt_path={ckpt}", f"--model.init_args.predict_dir={out}"])
    assert len(glob.glob(str(out / "labels" / "*.png"))) == 2
    # Lightning builds the model from the checkpoint's hyperparameters: a different given value is named
    with pytest.warns(UserWarning, match=r"model arguments are not used: head_kwargs=\{'channels': 32"):
        cli = build_cli(["validate", *shapes_args, f"--ckpt_path={ckpt}", "--trainer.fast_dev_run=1",
                         "--model.init_args.head_kwargs={channels: 32, norm: groupnorm}"])
    assert cli.model.hparams.head_kwargs["channels"] == 16
    cli = build_cli(["test", *shapes_args, "--ckpt_path=last", "--trainer.limit_test_batches=1"])
    assert cli.trainer.ckpt_path == ckpt  # the fit run's last.ckpt, found from a new run
    best = fit.trainer.checkpoint_callback.best_model_path  # the demo monitors val/mIoU
    assert best and os.path.basename(best).startswith("best-")
    cli = build_cli(["test", *shapes_args, "--ckpt_path=best", "--trainer.limit_test_batches=1"])
    assert os.path.samefile(cli.trainer.ckpt_path, best)
    # `last` / `best` build the model from the checkpoint's hyperparameters, as an explicit path: without the
    # fit's head_kwargs on the command line the architecture check used to stop the run
    other = [a for a in shapes_args if "head_kwargs" not in a]
    with pytest.warns(UserWarning, match=r"model arguments are not used: head_kwargs"):
        cli = build_cli(["test", *other, "--ckpt_path=last", "--trainer.limit_test_batches=1"])
    assert cli.trainer.ckpt_path == ckpt and cli.model.hparams.head_kwargs["channels"] == 16
    # under fast_dev_run (a DummyLogger) the run's folders were not searched
    cli = build_cli(["validate", *shapes_args, "--ckpt_path=last", "--trainer.fast_dev_run=1"])
    assert cli.trainer.ckpt_path == ckpt
    # a checkpoint of another task: LightningCLI built the checkpoint's class, which then failed elsewhere
    from mamba_dense.convert import CheckpointMismatchError

    coco = [a for a in shapes_args if not a.startswith(("--model.init_args.head_kwargs", "--data."))]
    coco[coco.index(DEMO)] = str(CONFIGS / "demo" / "coco_shapes.yaml")
    with pytest.raises(CheckpointMismatchError, match=r"holds a SemanticSegmentationTask but the config builds an? "
                                                      r"InstanceSegmentationTask.*Fix"):
        build_cli(["test", *coco, f"--data.init_args.root={tmp_path / 'coco'}", f"--ckpt_path={ckpt}"])


def test_bad_config_values_give_clear_errors(shapes_args):
    with pytest.raises(ValueError, match="datamodule has num_classes=5"):
        build_cli(["validate", *shapes_args, "--trainer.fast_dev_run=1", "--model.init_args.num_classes=7"])
    with pytest.raises(SystemExit):  # jsonargparse rejects values outside the Literal
        build_cli([*shapes_args, "--model.init_args.head=deeplab"], run=False)


def test_bad_weights_and_checkpoint_paths_give_their_message_alone(shapes_args, tmp_path, capsys):
    """Errors found by an exploratory run: a wrong encoder_weights file surfaced inside ~80 lines of
    jsonargparse's "Does not validate against any of the Union subtypes"; a missing --ckpt_path gave
    Lightning's traceback, a truncated one torch's "PytorchStreamReader failed" without the file name.
    Now each raises its own error naming the file and the fix, which the console script prints alone."""
    import torch

    from mamba_dense.cli import main
    from mamba_dense.convert import CheckpointMismatchError
    from mamba_dense.convert import CorruptCheckpointError
    from mamba_dense.tasks.guards import AtomicCheckpointIO, CheckpointNotFoundError

    run = ["validate", *shapes_args, "--trainer.fast_dev_run=1"]
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.bar": torch.zeros(3)}, wrong)
    with pytest.raises(CheckpointMismatchError, match="wrong.pth does not fit VMamba") as err:
        build_cli([*run, f"--model.init_args.encoder_weights={wrong}"])
    assert "Union subtypes" not in str(err.value)
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointNotFoundError, match=r"nope.ckpt: no such file. Fix: give a checkpoint"):
        build_cli([*run, f"--ckpt_path={missing}"])
    whole, cut = tmp_path / "whole.ckpt", tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "hyper_parameters": {}}, whole)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="cut.ckpt is not a readable PyTorch checkpoint"):
        build_cli([*run, f"--ckpt_path={cut}"])
    with pytest.raises(CorruptCheckpointError, match="cut.ckpt"):  # Trainer(ckpt_path=...) outside the CLI
        AtomicCheckpointIO().load_checkpoint(cut)
    with pytest.raises(SystemExit) as exit_:
        main([*run, f"--ckpt_path={missing}"])
    printed = capsys.readouterr().err
    assert exit_.value.code == 2 and "mamba-dense: error: --ckpt_path" in printed and "Traceback" not in printed


def test_checkpoint_runs_without_the_pretraining_file(shapes_args, tmp_path):
    """A run started from encoder_weights, evaluated from its checkpoint on a machine without that file:
    the checkpoint replaces every weight, so the file is not loaded. Before, its path was saved among the
    hyperparameters, which LightningCLI applies over the given config, so even the documented fix
    (`encoder_weights: null`) failed with FileNotFoundError (found by an exploratory run)."""
    import torch

    import mamba_dense

    pre = tmp_path / "pretrained.pth"
    torch.save(mamba_dense.create_encoder("vmamba_tiny", dims=16, depths=(1, 1, 1, 1)).state_dict(), pre)
    fit = build_cli(["fit", *shapes_args, "--trainer.max_steps=1", f"--model.init_args.encoder_weights={pre}"])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert "encoder_weights" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    pre.unlink()
    for extra in ([], ["--model.init_args.encoder_weights=null"], [f"--model.init_args.encoder_weights={pre}"]):
        cli = build_cli(["validate", *shapes_args, f"--ckpt_path={ckpt}", "--trainer.fast_dev_run=1", *extra])
        assert "val/mIoU" in cli.trainer.callback_metrics


RECIPES = sorted(str(p.relative_to(CONFIGS)) for d in ("ade20k", "coco") for p in (CONFIGS / d).glob("*.yaml"))
# drop path of each ADE20K recipe (see the comment in each file for its source)
DROP_PATH = {"vmamba_tiny": 0.2, "vmamba_small": 0.3, "vmamba_base": 0.6, "localvmamba_tiny": 0.2,
             "himamba_tiny": 0.2, "mambar_small": 0.1}


@pytest.mark.parametrize("config", [*RECIPES, "demo/coco_shapes.yaml"])
def test_recipe_configs_parse(config):
    cli = build_cli(["--config", str(CONFIGS / config), "--trainer.accelerator=cpu", "--trainer.devices=1",
                     "--trainer.strategy=auto", "--trainer.sync_batchnorm=false"], run=False)
    hp = cli.model.hparams
    raw = yaml.safe_load((CONFIGS / config).read_text())
    total_batch = raw["trainer"]["devices"] * raw["data"]["init_args"]["batch_size"]
    if "ade20k" in config:
        assert (hp.lr, hp.weight_decay, list(hp.betas), hp.warmup_iters, hp.head, hp.num_classes) == (
            6e-5, 0.01, [0.9, 0.999], 1500, "upernet", 150)
        assert hp.aux_head and hp.aux_weight == 0.4 and hp.head_kwargs["channels"] == 512
        assert hp.drop_path_rate == DROP_PATH[hp.encoder]
        assert config == f"ade20k/upernet_{hp.encoder}_512x512_160k.yaml"
        assert cli.trainer.max_steps == 160_000 and cli.datamodule.crop_size == (512, 512)
        assert total_batch == 16  # the published total batch
    if "coco/" in config:
        assert (hp.lr, hp.weight_decay, hp.num_classes, hp.drop_path_rate) == (1e-4, 0.05, 80, 0.2)
        assert total_batch == 16
        if config.endswith("_1x.yaml"):  # mmdet Swin 1x: single scale 1333x800
            assert (cli.trainer.max_epochs, hp.lr_milestones, hp.warmup_iters) == (12, [8, 11], 1000)
            assert tuple(cli.datamodule.train_scales) == (800,)
        else:  # VMamba ms_3x: 480..800 step 32
            assert (cli.trainer.max_epochs, hp.lr_milestones, hp.warmup_iters) == (36, [27, 33], 1000)
            assert tuple(cli.datamodule.train_scales) == tuple(range(480, 801, 32))
        assert cli.datamodule.max_size == 1333 and cli.datamodule.test_scale == 800


@pytest.mark.parametrize("root_flag", ["--data.init_args.root", "--data.root"])
def test_real_data_root_and_multi_gpu_flags_parse(root_flag, tmp_path):
    """The README's commands: data root either way, DDP with SyncBatchNorm (parsed only; CPU here)."""
    config = str(CONFIGS / "ade20k" / "upernet_vmamba_tiny_512x512_160k.yaml")
    cli = build_cli(["--config", config, root_flag, str(tmp_path), "--trainer.accelerator", "cpu",
                     "--trainer.devices", "4", "--trainer.strategy", "ddp", "--trainer.sync_batchnorm", "true"], run=False)
    assert str(cli.datamodule.root) == str(tmp_path)
    assert cli.trainer.num_devices == 4 and type(cli.trainer.strategy).__name__ == "DDPStrategy"
    # SyncBatchNorm conversion at setup, with our plugin (no host sync per layer)
    assert type(cli.trainer.strategy._layer_sync).__name__ == "NoHostSyncBatchNorm"


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mamba-dense"]
    assert script.value == "mamba_dense.cli:main"


def test_checkpoint_keyword_folders_follow_the_trainer_config(tmp_path):
    """`last` is resolved from the config before the Trainer exists: the folders must be those Lightning's
    ModelCheckpoints use (a checkpoint's own dirpath, not a newer stale run under default_root_dir; none with
    enable_checkpointing false)."""
    from mamba_dense.cli import _resolve_keyword

    stale = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    stale.mkdir(parents=True)
    own = tmp_path / "ck"
    own.mkdir()
    (own / "last.ckpt").write_bytes(b"own")
    (stale / "last.ckpt").write_bytes(b"stale")
    os.utime(own / "last.ckpt", (1, 1))  # the stale one is newer
    mc = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(own)}}
    cfg = {"default_root_dir": str(tmp_path / "runs"), "callbacks": [mc]}
    assert _resolve_keyword("last", cfg) == str(own / "last.ckpt")
    assert _resolve_keyword("last", {**cfg, "logger": False}) == str(own / "last.ckpt")
    plain = {"default_root_dir": str(tmp_path / "runs")}
    assert _resolve_keyword("last", plain) == str(stale / "last.ckpt")  # Lightning's default ModelCheckpoint
    assert _resolve_keyword("last", {**plain, "enable_checkpointing": False}) is None
