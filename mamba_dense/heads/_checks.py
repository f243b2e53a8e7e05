"""Argument and input checks shared by the 2D heads: clear errors instead of a conv's shape error."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_positive(head: str, **values: int) -> None:
    """Each named value must be an int >= 1 (``num_classes``, ``channels``, pool scales, ...)."""
    for name, v in values.items():
        items = list(v) if isinstance(v, (list, tuple)) else [v]
        if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in items):
            raise ValueError(f"{head}: {name} must be {'positive ints' if isinstance(v, (list, tuple)) else 'an int >= 1'}, "
                             f"got {v!r}.")


def check_feature_maps(head: str, features: Sequence[torch.Tensor], in_channels: Sequence[int]) -> None:
    """The encoder maps a head reads: as many as ``in_channels``, 4-D, with those channels."""
    if len(features) != len(in_channels):
        raise ValueError(f"{head} expects {len(in_channels)} feature maps (in_channels={list(in_channels)}), "
                         f"got {len(features)}.")
    got = [tuple(f.shape) for f in features]
    if any(f.dim() != 4 for f in features) or [s[1] for s in got] != list(in_channels):
        raise ValueError(f"{head} was built for maps of channels {list(in_channels)} (B, C, H, W), got shapes {got}; "
                         "build the head with the encoder's feature_info channels.")
