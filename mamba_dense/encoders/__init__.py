"""Encoders: hierarchical 2D vision-Mamba backbones (VMamba, LocalMamba, Hi-Mamba), Vim, 3D.

Every variant is registered here and in timm on import:

    >>> import timm, mamba_dense.encoders  # noqa: F401
    >>> m = timm.create_model("vmamba_tiny", features_only=True, depths=(1, 1, 1, 1), dims=16)
    >>> m.feature_info.reduction()
    [4, 8, 16, 32]

``create_encoder(name, **kwargs)`` and ``list_encoders(pattern)`` work without timm's namespace and
cover the 3D encoders too (``list_encoders(spatial_dims=3)``; those are not timm models).
:func:`feature_norm_map` measures per-token feature norms (Mamba(R)'s artifact maps).
"""

from ._features import EncoderStage, HierarchicalEncoder, feature_sizes
from ._registry import create_encoder, get_encoder_entry, is_encoder, list_encoders, register_encoder
from .artifacts import feature_norm_map
from .himamba import HiMamba
from .localmamba import LocalVMamba
from .vmamba import VMamba


def _optional(module: str):
    """Import a sibling family module that may not exist yet; real import errors inside it still raise."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module}":
            raise
        return None


vim = _optional("vim")  # written separately; their absence must not break the 2D encoders
volumetric = _optional("volumetric")

__all__ = [
    "VMamba",
    "LocalVMamba",
    "HiMamba",
    "HierarchicalEncoder",
    "EncoderStage",
    "feature_sizes",
    "create_encoder",
    "list_encoders",
    "register_encoder",
    "get_encoder_entry",
    "is_encoder",
    "feature_norm_map",
]
