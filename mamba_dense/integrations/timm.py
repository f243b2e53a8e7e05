"""timm adapter: importing this module registers every mamba-dense 2D encoder with timm.

The registration itself lives next to each model family (``@register_encoder`` in
``mamba_dense/encoders/<family>.py``, which calls ``timm.models.register_model``); this module only
triggers it and adds two conveniences.

Example:
    >>> import timm
    >>> import mamba_dense.integrations.timm  # noqa: F401
    >>> "vmamba_tiny" in timm.list_models("vmamba_*")
    True
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

import mamba_dense.encoders as _encoders

__all__ = ["timm_model_names", "create_timm_model"]


def timm_model_names(pattern: str = "*") -> list[str]:
    """mamba-dense encoders that timm knows (2D, registered through ``register_encoder``)."""
    return [n for n in _encoders.list_encoders(pattern) if _encoders.get_encoder_entry(n).in_timm]


def create_timm_model(name: str, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for our encoders; ``checkpoint`` is a local official checkpoint file.

    Example: ``create_timm_model("vmamba_tiny", "/ckpts/vssm1_tiny_0230s.pth", features_only=True)``.
    """
    if checkpoint is not None:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(checkpoint))
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    return timm.create_model(name, **kwargs)
