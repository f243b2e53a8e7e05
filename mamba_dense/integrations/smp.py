"""segmentation_models_pytorch adapter: our encoders as smp ``tu-<name>`` encoders.

Importing this module registers the encoders with timm, which is all smp needs:

    >>> import segmentation_models_pytorch as smp
    >>> import mamba_dense.integrations.smp  # noqa: F401
    >>> net = smp.UPerNet("tu-vmamba_tiny", encoder_weights=None, classes=3)  # doctest: +SKIP

smp's decoders need H and W divisible by 32 (its own ``check_input_shape``); the encoders
themselves accept any size. Vim / Mamba(R) give smp their simple pyramid (strides 4..32), so
``tu-vim_small`` works with UPerNet, FPN, Unet and Segformer like the hierarchical encoders.

NOTE: smp's ``depth`` keyword (number of encoder stages) shadows Vim's ``depth`` (number of
blocks); narrow Vim through smp by ``embed_dim`` / ``d_state`` instead.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch.nn as nn

from .timm import timm_model_names

__all__ = ["smp_encoder_name", "create_smp_model"]


def smp_encoder_name(name: str) -> str:
    """``"vmamba_tiny"`` -> ``"tu-vmamba_tiny"`` (checked against the registered names)."""
    bare = name[3:] if name.startswith("tu-") else name
    names = timm_model_names()
    if bare not in names:
        raise KeyError(f"{bare!r} is not a mamba-dense 2D encoder; available: {names}")
    return "tu-" + bare


def create_smp_model(
    arch: str, encoder: str, classes: int, checkpoint: str | None = None, **kwargs: Any
) -> nn.Module:
    """An smp model (``arch`` = "upernet", "fpn", "unet", "segformer", ...) on one of our encoders.

    Args:
        arch: smp architecture name (``smp.create_model``).
        encoder: our encoder name, with or without ``tu-``.
        classes: output channels.
        checkpoint: optional local official checkpoint for the encoder (converted on load).
        **kwargs: passed to ``smp.create_model`` (and through it to the encoder).
    """
    if checkpoint is not None:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(checkpoint))
        kwargs.update(encoder_weights=True, pretrained_cfg_overlay=overlay)
    else:
        kwargs.setdefault("encoder_weights", None)
    return smp.create_model(arch, encoder_name=smp_encoder_name(encoder), classes=classes, **kwargs)
