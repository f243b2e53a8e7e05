"""Per-token feature norms: the measurement Mamba(R) uses to show high-norm artifact tokens.

Mamba(R) (Wang et al. 2024, after Darcet et al., "Vision Transformers Need Registers") plots the L2
norm of every output token's feature over the image: without registers a few background tokens
have norms far above the rest; with registers the map follows the object. :func:`feature_norm_map`
computes that map for any of our encoders (also when wrapped by timm's ``features_only`` or smp).

The norms are taken on the raw residual stream (``norm=False``, the default): after the final
RMSNorm / LayerNorm every token is rescaled to about the same norm, which would hide the artifacts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["feature_norm_map"]


def _unwrap_encoder(model: nn.Module) -> nn.Module:
    """Our encoder inside timm's FeatureGetterNet, smp's TimmUniversalEncoder or an smp model."""
    m = model
    for _ in range(4):
        if hasattr(m, "forward_intermediates") and not hasattr(m, "out_indices"):
            return m
        inner = getattr(m, "model", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(m, "encoder", None)
        if not isinstance(inner, nn.Module):
            break
        m = inner
    raise TypeError(
        f"{type(model).__name__} is not a mamba-dense encoder (or a timm/smp wrapper of one); "
        "build it with mamba_dense.create_encoder(name) or timm.create_model(name)"
    )


@torch.no_grad()
def feature_norm_map(model: nn.Module, image: torch.Tensor, index: int = -1, norm: bool = False) -> torch.Tensor:
    """L2 norm of each output token's feature, as a map.

    Args:
        model: a mamba-dense encoder, or a timm / smp wrapper of one.
        image: (B, C, H, W) images (or (B, C, D, H, W) volumes for the 3D encoders).
        index: which feature: a block for Vim / Mamba(R) (default the last one, stride 16, with or
            without the dense pyramid), a stage for the hierarchical and 3D encoders (default the
            last, stride 32 / 16). Use ``index=0`` for the finest hierarchical map.
        norm: apply the encoder's final norm first (Vim / Mamba(R) blocks, last hierarchical stage).

    Returns:
        (B, H', W') norms of the patch tokens (class token and registers excluded), float32;
        (B, D', H', W') for volumes.

    Example:
        >>> import mamba_dense.encoders as enc
        >>> m = enc.create_encoder("mambar_small", depth=2, embed_dim=32, num_classes=0).eval()
        >>> feature_norm_map(m, torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 4, 6])
    """
    enc = _unwrap_encoder(model)
    if hasattr(enc, "forward_block_maps"):  # plain encoders (Vim / Mamba(R)): block outputs
        fmap = enc.forward_block_maps(image, indices=[index], norm=norm)[0]
    else:
        fmap = enc.forward_intermediates(image, indices=[index], norm=norm, intermediates_only=True)[0]
    return fmap.float().norm(dim=1)
