"""mamba-dense: vision-Mamba encoders for dense prediction on one shared Triton scan operator.

Top-level shortcuts (imported on first use, so ``import mamba_dense`` stays light):

- ``mamba_dense.create_encoder(name, **kwargs)``: any registered 2D or 3D encoder;
- ``mamba_dense.list_encoders(pattern="*", family=None, spatial_dims=None)``;
- ``mamba_dense.feature_norm_map(model, image)``: per-token feature norms (B, H', W').
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Nothing may reach the network at run time: albumentations otherwise checks PyPI for a newer
# version on import (a DNS lookup and a warning on offline machines).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

_LAZY = {
    "create_encoder": "mamba_dense.encoders",
    "list_encoders": "mamba_dense.encoders",
    "feature_norm_map": "mamba_dense.encoders",
}

__all__ = ["create_encoder", "list_encoders", "feature_norm_map", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mamba_dense' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
