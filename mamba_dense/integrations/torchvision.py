"""torchvision adapter: our encoders as detection backbones.

torchvision's own helpers (``BackboneWithFPN``, ``IntermediateLayerGetter``,
``create_feature_extractor``) need a backbone whose children run in order or that torch.fx can
trace; the hierarchical Mamba encoders run their stages through cached scan routes and an opaque
custom op, so they are wrapped here instead, the way ``resnet_fpn_backbone`` wraps a ResNet: the
encoder's 4 maps (strides 4, 8, 16, 32) go through torchvision's ``FeaturePyramidNetwork`` with a
max-pooled extra level. The result has ``out_channels`` and returns an ``OrderedDict`` of levels
"0".."3" and "pool", so it drops into any torchvision detector.

Example:
    >>> from torchvision.models.detection import FasterRCNN
    >>> from mamba_dense.integrations.torchvision import encoder_fpn_backbone
    >>> backbone = encoder_fpn_backbone("vmamba_tiny", depths=(1, 1, 1, 1), dims=16)
    >>> model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=96)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from torchvision.models.detection import MaskRCNN

from mamba_dense.heads.maskrcnn import EncoderFPN, build_mask_rcnn

from .timm import create_timm_model

__all__ = ["encoder_fpn_backbone", "mask_rcnn"]


def encoder_fpn_backbone(name: str, checkpoint: str | None = None, out_channels: int = 256,
                         **encoder_kwargs: Any) -> EncoderFPN:
    """A torchvision detection backbone (FPN levels "0".."3" + "pool", ``out_channels`` wide) on
    encoder ``name`` (a 2D mamba-dense encoder, see ``mamba_dense.list_encoders()``).

    Args:
        name: encoder name.
        checkpoint: a local official (or mamba-dense) checkpoint, loaded strictly; never downloaded.
        out_channels: FPN width (256 in torchvision's detectors).
        **encoder_kwargs: encoder arguments (e.g. ``drop_path_rate``, or narrower ``dims``).
    """
    encoder = create_timm_model(name, checkpoint, features_only=True, out_indices=(0, 1, 2, 3), **encoder_kwargs)
    return EncoderFPN(encoder, encoder.feature_info.channels(), out_channels)


def mask_rcnn(name: str, num_classes: int, checkpoint: str | None = None, out_channels: int = 256,
              encoder_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> MaskRCNN:
    """torchvision's ``MaskRCNN`` on encoder ``name`` with the recipe's anchors and RoI poolers
    (``mamba_dense.heads.build_mask_rcnn``).

    Args:
        name, checkpoint, out_channels: as in :func:`encoder_fpn_backbone`.
        num_classes: object classes, background excluded (labels 1..num_classes).
        encoder_kwargs: encoder arguments.
        **kwargs: ``build_mask_rcnn`` / ``MaskRCNN`` arguments (``min_size``, ``max_size``, ...).
    """
    backbone = encoder_fpn_backbone(name, checkpoint, out_channels, **(encoder_kwargs or {}))
    return build_mask_rcnn(backbone, num_classes, **kwargs)
