"""encoder_weights of the 2D and 3D tasks: one strict loader (``mamba_dense.convert``) for official files,
our own task checkpoints (``mamba-dense fit``'s last.ckpt) and bad files, whose errors name the file."""

from __future__ import annotations

import re
import warnings

import lightning
import pytest
import torch

from mamba_dense.convert import CheckpointMismatchError, CorruptCheckpointError, load_encoder_weights
from mamba_dense.tasks import InstanceSegmentationTask, SemanticSegmentationTask, VolumetricSegmentationTask
from mamba_dense.tasks._encoder import Encoder

SEG3D = dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), d_state=2)
TINY3D = dict(patch_size=(16, 16, 16), decoder_channels=[4, 8, 16, 16])


def _task3d(**kw) -> VolumetricSegmentationTask:
    kw.setdefault("encoder_kwargs", dict(SEG3D))
    return VolumetricSegmentationTask(3, encoder="segmamba_tiny", **TINY3D, **kw)


def _lightning_ckpt(path, task) -> str:
    """What `mamba-dense fit` writes, less the loop and optimizer states; the weights moved off their init."""
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn_like(p))
    torch.save({"epoch": 0, "global_step": 2, "pytorch-lightning_version": lightning.__version__,
                "state_dict": task.state_dict(), "hparams_name": "kwargs",
                "hyper_parameters": {"_class_path": f"mamba_dense.tasks.{type(task).__name__}", **task.hparams}}, path)
    return str(path)


def _bad_files(tmp_path, good) -> dict[str, str]:
    (tmp_path / "notes.pth").write_bytes(b"not a checkpoint")
    data = open(good, "rb").read()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    return {"not a PyTorch checkpoint": str(tmp_path / "notes.pth"), "truncated": str(tmp_path / "half.pth")}


# ---------------------------------------------------------------------------------------------
# 3D task (D3: it loaded with weights_only=False and strict=False, and raised raw torch errors)


def test_volumetric_weights_load_strictly_with_errors_naming_the_file(tmp_path):
    source = _task3d().encoder
    good = tmp_path / "segmamba.pth"
    torch.save(source.state_dict(), good)
    task = _task3d(encoder_weights=str(good))
    torch.testing.assert_close(task.encoder.stem.weight, source.stem.weight)

    wide = tmp_path / "wide.pth"  # another width: a size mismatch, not RuntimeError from load_state_dict
    torch.save(_task3d(encoder_kwargs=dict(SEG3D, dims=(8, 16, 16, 32))).encoder.state_dict(), wide)
    with pytest.raises(CheckpointMismatchError, match=r"wide\.pth does not fit SegMambaEncoder: .*shape mismatches"):
        _task3d(encoder_weights=str(wide))
    for what, path in _bad_files(tmp_path, good).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "loading it with weights_only=False" on the way
            with pytest.raises(CorruptCheckpointError, match=re.escape(path) + f".*{what}.*Fix: "):
                _task3d(encoder_weights=path)
    with pytest.raises(FileNotFoundError, match="encoder_weights="):
        _task3d(encoder_weights=str(tmp_path / "missing.pth"))


def test_volumetric_weights_convert_segmamba_official_whole_model(tmp_path):
    from encoders import _official as official  # tests/ is on sys.path (conftest)

    sd = official.segmamba_encoder(**SEG3D)
    whole = {"vit." + k: v for k, v in sd.items()} | {"decoder5.transp_conv.conv.weight": torch.zeros(2)}
    path = tmp_path / "segmamba_official.pth"
    torch.save({"model": whole}, path)
    task = _task3d(encoder_weights=str(path))
    torch.testing.assert_close(task.encoder.stages[1][0].mamba.ssm.A_logs[2], sd["stages.1.0.mamba.A_s_log"])


# ---------------------------------------------------------------------------------------------
# 2D task, a file that is no checkpoint (D4: warned "holds non-tensor objects" and unpickled it)


def test_semantic_weights_not_a_checkpoint(tmp_path, tiny_encoder):
    good = tmp_path / "vmamba.pth"
    torch.save(Encoder("vmamba_tiny", **tiny_encoder["encoder_kwargs"]).model.model.state_dict(), good)
    for what, path in _bad_files(tmp_path, good).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(CorruptCheckpointError, match=re.escape(path) + f".*{what}.*Fix: "):
                SemanticSegmentationTask(num_classes=3, head="fpn", encoder_weights=path, **tiny_encoder)


# ---------------------------------------------------------------------------------------------
# our own task checkpoints as encoder weights (D5: "does not fit VMamba: 92 missing keys")


def test_own_semantic_checkpoint_gives_its_encoder(tmp_path, tiny_encoder):
    trained = SemanticSegmentationTask(num_classes=3, head="fpn", **tiny_encoder)
    path = _lightning_ckpt(tmp_path / "last.ckpt", trained)
    task = SemanticSegmentationTask(num_classes=5, head="upernet", head_kwargs={"channels": 16}, encoder_weights=path,
                                    **tiny_encoder)
    for (name, p), (_, q) in zip(trained.encoder.named_parameters(), task.encoder.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)
    report = load_encoder_weights(Encoder("vmamba_tiny", **tiny_encoder["encoder_kwargs"]).model, path)
    assert report.ignored and all(k.startswith(("decode_head.", "aux_head.")) for k in report.ignored)
    assert not report.initialized and len(report.loaded) == len(trained.encoder.model.model.state_dict())

    other = tmp_path / "other.ckpt"  # a Lightning checkpoint with no encoder of ours
    torch.save({"pytorch-lightning_version": lightning.__version__, "state_dict": {"net.weight": torch.ones(2)}}, other)
    with pytest.raises(CheckpointMismatchError, match=r"other\.ckpt.*Lightning checkpoint.*--ckpt_path"):
        SemanticSegmentationTask(num_classes=3, encoder_weights=str(other), **tiny_encoder)


def test_own_instance_and_volumetric_checkpoints_give_their_encoder(tmp_path, tiny_encoder, small_rcnn):
    rcnn = InstanceSegmentationTask(num_classes=2, fpn_channels=16, maskrcnn_kwargs=small_rcnn, **tiny_encoder)
    path = _lightning_ckpt(tmp_path / "rcnn.ckpt", rcnn)
    task = SemanticSegmentationTask(num_classes=3, head="fpn", encoder_weights=path, **tiny_encoder)
    body = rcnn.model.backbone.body  # tasks._encoder.Encoder, as the semantic task's encoder
    for (name, p), (_, q) in zip(body.named_parameters(), task.encoder.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)

    trained = _task3d()
    path = _lightning_ckpt(tmp_path / "seg3d.ckpt", trained)
    task = _task3d(encoder_weights=path)
    for (name, p), (_, q) in zip(trained.encoder.named_parameters(), task.encoder.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)
    report = load_encoder_weights(_task3d().encoder, path)
    assert report.ignored and all(k.startswith("decoder.") for k in report.ignored)


def test_timm_models_own_weights_through_the_task_encoder(tmp_path):
    """Encoder("resnet18", weights=...) told the user that resnet18 is not a mamba-dense encoder, although the
    docstring offers any timm model: timm's loader loads it now, with its logged key mismatches refused."""
    import timm

    from mamba_dense.convert import CheckpointMismatchError
    from mamba_dense.tasks._encoder import Encoder

    src = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    enc = Encoder("resnet18", weights=str(path))
    torch.testing.assert_close(enc.model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert "state_dict" not in enc.model.pretrained_cfg
    other = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), other)
    with pytest.raises(CheckpointMismatchError, match=r"resnet34.pth.*does not fit timm's 'resnet18'.*unexpected keys"):
        Encoder("resnet18", weights=str(other))
