"""timm glue shared by the 2D families: default pretrained cfgs and ``build_model_with_cfg``.

``features_only=True`` wraps the model in timm's ``FeatureGetterNet``, which calls the model's own
``forward_intermediates`` (so the any-size rule of ``_features.py`` holds for features too).
Pretrained weights come from a local file only: ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file="/path/ckpt.pth"))``; each family's ``checkpoint_filter_fn``
maps the official key names onto ours (:func:`unwrap_checkpoint` first removes training-checkpoint
wrappers and mmseg prefixes). ``mamba_dense.convert.load_encoder_weights`` is the strict,
reporting path for any encoder.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

__all__ = ["encoder_cfg", "build_encoder", "pretrained_filter", "forget_loaded_state", "unwrap_checkpoint"]


def encoder_cfg(**kwargs: Any) -> dict[str, Any]:
    """A timm pretrained cfg with no download location (weights load from a file path only)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


def build_encoder(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    pretrained_filter_fn: Callable | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.models.build_model_with_cfg`` with the 4-stage feature getter as feature adapter.

    ``pretrained=True`` needs a local file (no downloads): ``pretrained_cfg_overlay=dict(file=path)``;
    it loads as strictly as ``mamba_dense.convert.load_encoder_weights`` (:func:`pretrained_filter`).
    """
    filter_fn = pretrained_filter(variant, pretrained, kwargs, pretrained_filter_fn)
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )
    return forget_loaded_state(model)


def pretrained_filter(variant: str, pretrained: bool, kwargs: dict[str, Any], family_filter: Callable | None):
    """The ``pretrained_filter_fn`` for timm: with ``pretrained=True``, the file named in the cfg
    (never a download; ValueError without one) loads through ``convert.checked_filter``, which
    converts with the family's filter and raises ``CheckpointMismatchError`` naming the file for a
    checkpoint that does not fit (timm itself loads features-only models with strict=False and
    only logs the keys it could not place).

    The file is read by the filter with ``convert.read_checkpoint`` (the reader of ``load_encoder_weights``:
    its errors, its handling of pickled training configs, the same entry of a file with ``model`` and
    ``model_ema``), not by timm's loader: the cfg's ``state_dict`` (``kwargs["pretrained_cfg_overlay"]`` is
    replaced) is a placeholder naming the file; :func:`forget_loaded_state` drops it from the built model's cfg."""
    if not pretrained:
        return family_filter
    cfgs = (kwargs.get("pretrained_cfg_overlay") or {}, kwargs.get("pretrained_cfg") or {})
    # a dict, or timm's PretrainedCfg dataclass
    files = (c.get("file") if isinstance(c, Mapping) else getattr(c, "file", None) for c in cfgs)
    file = next((f for f in files if f), None)
    if file is None:
        raise ValueError(
            f"{variant}: weights are never downloaded; pass the official checkpoint as a file, e.g. "
            f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file='/path/ckpt.pth')) "
            "(smp: encoder_weights=True plus the same pretrained_cfg_overlay), or use pretrained=False"
        )
    from mamba_dense.convert import FILE_PLACEHOLDER, checked_filter

    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file!r} is not a file; weights load from a local checkpoint path only")
    # NOTE: timm deep-copies its cfg (dataclasses.asdict), so the cfg gets a placeholder, not the tensors;
    # checked_filter reads the file itself
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=str(file), state_dict={FILE_PLACEHOLDER: str(file)})
    kwargs["pretrained_cfg_overlay"] = overlay
    return checked_filter(file)


def forget_loaded_state(model: nn.Module) -> nn.Module:
    """Drop the checkpoint that :func:`pretrained_filter` put in the cfg (timm keeps the cfg on the model)."""
    for m in model.modules():
        cfg = m.__dict__.get("pretrained_cfg")
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model


_WRAPPER_KEYS = ("model", "state_dict", "module", "model_ema", "state_dict_ema")
# Where the mamba-dense tasks keep their encoder: SemanticSegmentationTask.encoder and
# InstanceSegmentationTask.model.backbone.body are a tasks._encoder.Encoder, whose .model is timm's
# FeatureGetterNet around our encoder (.model); VolumetricSegmentationTask.encoder is ours.
_TASK_ENCODERS = ("encoder.model.model.", "model.backbone.body.model.model.", "encoder.")


def checkpoint_tensors(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a training checkpoint: its first ``_WRAPPER_KEYS`` entry that holds a dict (or the
    checkpoint itself), with DDP's ``module.`` prefix removed."""
    sd: Mapping[str, Any] = checkpoint
    for key in _WRAPPER_KEYS:
        if isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a training checkpoint, with wrappers and framework prefixes removed.

    Takes the first of ``model`` / ``state_dict`` / ``module`` / ``model_ema`` that holds a dict
    (the official VMamba, LocalMamba, Vim, Mamba(R), mmseg and SegMamba files use one of these),
    strips ``module.`` (DDP), ``backbone.`` (mmseg/mmdet) and ``encoder.`` prefixes and, for a whole
    segmentor/detector checkpoint (keys under ``backbone.`` next to others), keeps the backbone.
    A task checkpoint of ours (``mamba-dense fit``'s Lightning checkpoint; also a 2D task's bare state
    dict) gives its encoder (under one of ``_TASK_ENCODERS``); the heads / decoder are left out.

    Returns:
        (state dict, names of the tensors left out: decoder / neck keys of a segmentor checkpoint,
        the heads of a task checkpoint).

    Raises:
        CheckpointMismatchError: a Lightning checkpoint with no encoder of a mamba-dense task in it.
    """
    from mamba_dense.convert import checkpoint_mapping

    checkpoint = checkpoint_mapping(checkpoint)
    tensors = checkpoint_tensors(checkpoint)
    lightning = "pytorch-lightning_version" in checkpoint
    task = next((p for p in _TASK_ENCODERS if any(k.startswith(p) for k in tensors)), None)
    if task is not None and (lightning or task != "encoder."):  # else an encoder saved under "encoder."
        left_out = sorted(k for k in tensors if not k.startswith(task))
        return {k.removeprefix(task): v for k, v in tensors.items() if k.startswith(task)}, left_out
    if lightning:
        from mamba_dense.convert import CheckpointMismatchError

        hparams = checkpoint.get("hyper_parameters")
        owner = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
        raise CheckpointMismatchError(
            f"a Lightning checkpoint ({owner or 'of a LightningModule'}; modules "
            f"{sorted({k.split('.', 1)[0] for k in tensors})}) without the encoder of a mamba-dense task "
            f"(tensors under {', '.join(_TASK_ENCODERS)}). Fix: resume or evaluate a trained task with "
            "--ckpt_path <file> (the whole task), not as encoder weights; for another model's encoder, save "
            "that encoder's state dict to a file of its own."
        )
    left_out: list[str] = []
    if any(k.startswith("backbone.") for k in tensors) and not all(k.startswith("backbone.") for k in tensors):
        left_out = sorted(k for k in tensors if not k.startswith("backbone."))
        tensors = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    out = {}
    for k, v in tensors.items():
        for pre in ("backbone.", "encoder."):
            k = k.removeprefix(pre)
        out[k] = v
    return out, left_out
