"""Decoders and detection heads: UPerNet, semantic FPN, FCN auxiliary, Mask R-CNN, 3D UNet decoder."""

from .fpn import FPNHead
from .maskrcnn import EncoderFPN, build_mask_rcnn, make_transform
from .unet3d import UNet3DDecoder
from .upernet import FCNHead, UPerNetHead

__all__ = ["EncoderFPN", "FCNHead", "FPNHead", "UNet3DDecoder", "UPerNetHead", "build_mask_rcnn", "make_transform"]
