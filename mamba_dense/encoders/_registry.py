"""A registry of encoder entry points, mirrored into timm's registry.

Each family module decorates its variants with :func:`register_encoder`; the function is stored
here under its ``__name__`` and (for 2D encoders) registered with ``timm.models.register_model``,
so ``timm.create_model(name, features_only=True)`` and smp's ``tu-<name>`` encoders find it.

Example:
    >>> import mamba_dense.encoders as enc
    >>> "vmamba_tiny" in enc.list_encoders("vmamba_*")
    True
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

__all__ = ["EncoderEntry", "register_encoder", "create_encoder", "list_encoders", "get_encoder_entry", "is_encoder"]


@dataclass(frozen=True)
class EncoderEntry:
    """One registered variant: its entry point, family (module name) and spatial dimensionality."""

    name: str
    fn: Callable[..., nn.Module]
    family: str
    spatial_dims: int = 2
    in_timm: bool = True


_ENCODERS: dict[str, EncoderEntry] = {}


def register_encoder(
    fn: Callable[..., nn.Module] | None = None, *, spatial_dims: int = 2, timm: bool | None = None
) -> Any:
    """Register an entry point ``fn(pretrained=False, **kwargs) -> nn.Module`` under ``fn.__name__``.

    Args:
        spatial_dims: 2 for image encoders, 3 for volume encoders.
        timm: also register with ``timm.models.register_model`` (default: only when spatial_dims == 2).

    Usable bare (``@register_encoder``) or with arguments (``@register_encoder(spatial_dims=3)``).
    """

    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        to_timm = (spatial_dims == 2) if timm is None else timm
        family = f.__module__.rsplit(".", 1)[-1]
        _ENCODERS[f.__name__] = EncoderEntry(f.__name__, f, family, spatial_dims, to_timm)
        if to_timm:
            from timm.models import register_model

            register_model(f)
        return f

    return deco(fn) if fn is not None else deco


def create_encoder(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered encoder by name (kwargs go to the entry point, e.g. ``features_only=True``)."""
    return get_encoder_entry(name).fn(pretrained=pretrained, **kwargs)


def get_encoder_entry(name: str) -> EncoderEntry:
    try:
        return _ENCODERS[name]
    except KeyError:
        close = fnmatch.filter(_ENCODERS, f"*{name.split('_')[0]}*")
        hint = f"; similar: {sorted(close)}" if close else f"; registered: {sorted(_ENCODERS)}"
        raise KeyError(f"unknown encoder {name!r}{hint}") from None


def is_encoder(name: str) -> bool:
    return name in _ENCODERS


def list_encoders(pattern: str = "*", family: str | None = None, spatial_dims: int | None = None) -> list[str]:
    """Sorted names matching a glob ``pattern``, optionally one family (module) or dimensionality."""
    return sorted(
        n
        for n, e in _ENCODERS.items()
        if fnmatch.fnmatch(n, pattern)
        and (family is None or e.family == family)
        and (spatial_dims is None or e.spatial_dims == spatial_dims)
    )
