"""Every shipped 2D config, run in-process through the CLI: fit -> test from the checkpoint -> predict.

The configs are found by glob, so a new file under configs/ is covered without editing this
test. Each runs as written except for what makes it CPU- and test-sized: data root on synthetic
files of the config's format, a toy encoder of the same family, 1 batch per stage (as
`fast_dev_run`, but with the checkpoint and logs that `test`/`predict` then read), CPU, 1 device.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from mamba_dense.cli import build_cli
from mamba_dense.datamodules.synthetic import write_ade20k_like, write_coco_like

pytestmark = [
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended"),
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
    pytest.mark.filterwarnings("ignore:The '.*_dataloader' does not have many workers"),
]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# 3D configs are covered by the volumetric tests.
NOT_HERE = {"msd", "demo/volumes.yaml"}
CONFIG_FILES = sorted(
    p for p in CONFIGS.rglob("*.yaml")
    if not any(str(p.relative_to(CONFIGS)).startswith(skip) for skip in NOT_HERE)
)

# The encoder of each family at toy size (same code path, 16 channels, one block per stage).
_HIER = {"dims": 16, "depths": [1, 1, 1, 1]}
TOY_ENCODERS = {
    "vmamba": _HIER,
    "himamba": _HIER,
    "localvmamba": dict(_HIER, directions=[["h", "v_flip", "w2", "w7"]] * 4),
    "mambar": {"embed_dim": 16, "depth": 2, "d_state": 2},
    "vim": {"embed_dim": 16, "depth": 2, "d_state": 2},
}
TOY_RCNN = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
                rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, box_detections_per_img=10)
ONE_BATCH = [
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.sync_batchnorm=false",
    "--trainer.max_epochs=1", "--trainer.max_steps=1", "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1",
    "--trainer.val_check_interval=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
]


def _flow(value) -> str:
    return json.dumps(value)  # JSON is YAML flow style: one command-line value


def toy_model_args(model: dict) -> list[str]:
    """Overrides shrinking the config's model to test size, keeping its other settings."""
    init = model["init_args"]
    family = init.get("encoder", "vmamba_tiny").split("_")[0]
    encoder_kwargs = dict(init.get("encoder_kwargs") or {})
    encoder_kwargs.update(TOY_ENCODERS[family])
    if family in ("vim", "mambar"):
        encoder_kwargs.pop("feature_norms", None)
    args = [f"--model.init_args.encoder_kwargs={_flow(encoder_kwargs)}"]
    if model["class_path"].endswith("SemanticSegmentationTask"):
        head_kwargs = dict(init.get("head_kwargs") or {})
        if init.get("head", "upernet") == "upernet":
            head_kwargs["channels"] = 16
        else:
            head_kwargs.update(pyramid_channels=16, segmentation_channels=32)
        args.append(f"--model.init_args.head_kwargs={_flow(head_kwargs)}")
    else:
        args += ["--model.init_args.fpn_channels=16", f"--model.init_args.maskrcnn_kwargs={_flow(TOY_RCNN)}"]
    return args


def toy_data_args(data: dict, root: Path) -> list[str]:
    """Overrides pointing the config's datamodule at synthetic files of its format."""
    kind = data["class_path"].rsplit(".", 1)[-1]
    common = ["--data.init_args.batch_size=2", "--data.init_args.val_batch_size=1", "--data.init_args.num_workers=0"]
    if kind == "ADE20KDataModule":  # real layout, all 150 classes present in the label range
        write_ade20k_like(root, num_train=2, num_val=2, num_classes=data["init_args"].get("num_classes", 150),
                          size_range=(64, 96))
        return [f"--data.init_args.root={root}", "--data.init_args.crop_size=64", "--data.init_args.scale=[128, 64]",
                *common]
    if kind == "ShapesDataModule":
        return [f"--data.init_args.root={root}", "--data.init_args.crop_size=64", "--data.init_args.num_train=2",
                "--data.init_args.num_val=2", *common]
    if kind == "COCOInstanceDataModule":  # 4 categories: the model is told so
        write_coco_like(root, num_train=2, num_val=2, size_range=(64, 96))
        return [f"--data.init_args.root={root}", "--data.init_args.train_scales=[64]", "--data.init_args.test_scale=64",
                "--data.init_args.max_size=96", "--model.init_args.num_classes=4", *common]
    if kind == "SyntheticCOCODataModule":
        return [f"--data.init_args.root={root}", "--data.init_args.num_train=2", "--data.init_args.num_val=2", *common]
    raise AssertionError(f"no synthetic data for {kind}: add it to toy_data_args")


def test_configs_are_found():
    names = {str(p.relative_to(CONFIGS)) for p in CONFIG_FILES}
    assert {"demo/shapes.yaml", "demo/coco_shapes.yaml", "ade20k/upernet_vmamba_tiny_512x512_160k.yaml",
            "coco/maskrcnn_vmamba_tiny_1x.yaml"} <= names
    assert not any(n.startswith("msd") or n == "demo/volumes.yaml" for n in names)


@pytest.mark.parametrize("config", CONFIG_FILES, ids=[str(p.relative_to(CONFIGS)) for p in CONFIG_FILES])
def test_config_fit_test_predict(config, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    base = [
        "--config", str(config), *ONE_BATCH, f"--trainer.default_root_dir={tmp_path / 'runs'}",
        *toy_model_args(cfg["model"]), *toy_data_args(cfg["data"], tmp_path / "data"),
    ]
    semantic = cfg["model"]["class_path"].endswith("SemanticSegmentationTask")

    fit = build_cli(["fit", *base])
    callback = fit.trainer.checkpoint_callback
    ckpt = callback.last_model_path or callback.best_model_path
    assert ckpt and os.path.isfile(ckpt), "fit wrote no checkpoint"
    assert ("val/mIoU" if semantic else "val/segm_AP") in fit.trainer.callback_metrics
    assert os.path.isfile(os.path.join(fit.trainer.log_dir, "config.yaml"))

    test = build_cli(["test", *base, f"--ckpt_path={ckpt}"])
    assert ("test/mIoU" if semantic else "test/segm_AP") in test.trainer.callback_metrics
    # the model that was tested is the trained one
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    name, value = next(iter(state.items()))
    torch.testing.assert_close(test.model.state_dict()[name], value)

    out = tmp_path / "pred"
    build_cli(["predict", *base, f"--ckpt_path={ckpt}", f"--model.init_args.predict_dir={out}"])
    written = glob.glob(str(out / "**" / "*.png"), recursive=True)
    assert written, f"predict wrote nothing under {out}"
    if not semantic:
        assert json.loads((out / "coco_results.json").read_text()) is not None


@pytest.mark.slow
def test_demo_full_run_reaches_the_documented_miou(tmp_path):
    """The demo exactly as a user runs it (only paths and the progress bar differ): val mIoU >= 0.6."""
    fit = build_cli([
        "fit", "--config", str(CONFIGS / "demo" / "shapes.yaml"), f"--data.init_args.root={tmp_path / 'shapes'}",
        f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false",
    ])
    final = float(fit.trainer.callback_metrics["val/mIoU"])
    assert final >= 0.6, f"demo val mIoU {final:.3f} < 0.6"
    log_dir = Path(fit.trainer.log_dir)
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    # Lightning's default logger: TensorBoard when it is installed (metrics and overlays go to its event
    # file, as the README says), else CSV (metrics.csv, overlays as PNGs).
    if isinstance(fit.trainer.logger, TensorBoardLogger):
        assert list(log_dir.glob("events.out.tfevents.*"))
    else:
        assert (log_dir / "metrics.csv").is_file()
        assert list((log_dir / "overlays").glob("epoch_*/*.png"))
