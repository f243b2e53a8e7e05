"""Decoders and detection heads: UPerNet, semantic FPN, FCN auxiliary, Mask R-CNN."""

from .fpn import FPNHead
from .maskrcnn import EncoderFPN, build_mask_rcnn, make_transform
from .upernet import FCNHead, UPerNetHead

__all__ = ["EncoderFPN", "FCNHead", "FPNHead", "UPerNetHead", "build_mask_rcnn", "make_transform"]
