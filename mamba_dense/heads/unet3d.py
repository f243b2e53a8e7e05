"""UNet-style 3D decoder for the volumetric encoders (residual conv blocks, transposed-conv
upsampling, skip connections, optional deep supervision).

The 3D encoders give maps at strides 2, 4, 8, 16 (``feature_info``). The decoder adds a
full-resolution skip from the image itself (a residual block on the input, as SegMamba's and
UNETR's ``encoder1``), refines every encoder map with a residual block, and climbs back with
2x transposed convolutions, each followed by concatenation with the skip and a residual block.
Encoder maps of odd-sized inputs are ``ceil(n / 2)`` per step, so every upsampled map is cropped
to its skip's size: any input size works.

Blocks follow nnU-Net's residual encoder / MONAI's ``UnetResBlock``: conv 3^3 - norm - LeakyReLU
(0.01) - conv 3^3 - norm, plus the input (through a 1^3 conv + norm when the width changes),
then LeakyReLU. The norm is instance norm with affine parameters, computed as ``group_norm``
with one group per channel so that a single voxel per channel (a 16^3 window at stride 16) is
allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mamba_dense.kernels.instance_norm import instance_norm_act

__all__ = ["InstanceNorm3dAffine", "ResBlock3d", "UNet3DDecoder", "UpBlock3d"]


class InstanceNorm3dAffine(nn.Module):
    """Instance norm with per-channel affine parameters, valid for 1 voxel per channel.

    ``forward(x, act)`` fuses "none", "relu" or "leaky_relu" (slope 0.01); see
    ``mamba_dense.kernels.instance_norm`` (Triton on CUDA, ``torch.group_norm`` on CPU).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        return instance_norm_act(x, self.weight, self.bias, self.eps, act, 0.01)


class ResBlock3d(nn.Module):
    """Residual block: conv3-IN-LReLU-conv3-IN + (1^3 conv-IN) shortcut, LReLU. (B, in, ...) -> (B, out, ...)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = InstanceNorm3dAffine(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = InstanceNorm3dAffine(out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut = (
            nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False), InstanceNorm3dAffine(out_channels))
            if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.conv1(x), act="leaky_relu")  # = LeakyReLU(IN(.)), fused
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class UpBlock3d(nn.Module):
    """2x transposed conv (in -> out), crop to the skip, concatenate it, ResBlock3d(2 out -> out)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
        self.block = ResBlock3d(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        d, h, w = skip.shape[-3:]
        x = self.up(x)[..., :d, :h, :w]  # encoder maps are ceil(n / 2): crop the overhang
        return self.block(torch.cat([x, skip], dim=1))


class UNet3DDecoder(nn.Module):
    """UNet decoder over 3D encoder maps at strides 2, 4, 8, 16 plus the image at stride 1.

    Args:
        encoder_channels: channels of the encoder maps at strides 2, 4, 8, 16 (``feature_info``).
        num_classes: output channels (classes, or regions for sigmoid outputs).
        in_channels: image channels (for the full-resolution skip block).
        decoder_channels: widths at strides 1, 2, 4, 8 (default: 32 and the encoder's first three
            widths); the stride-16 bottleneck keeps the encoder's last width.
        deep_supervision: also return logits at strides 2 and 4 in training (``forward`` returns
            a list then, full resolution first). nnU-Net also has outputs further down but gives
            the lowest a weight of 0; leaving it out keeps every parameter in use (DDP).

    Shapes:
        image (B, in_channels, D, H, W), feats [(B, C_i, ceil(D / 2^(i+1)), ...)] ->
        logits (B, num_classes, D, H, W) (or a list with deep supervision in training).

    Example:
        >>> dec = UNet3DDecoder((8, 16, 16, 16), num_classes=3, in_channels=1, decoder_channels=(8, 8, 16, 16))
        >>> dec(torch.randn(1, 1, 9, 8, 8), [torch.randn(1, 8, 5, 4, 4), torch.randn(1, 16, 3, 2, 2),
        ...     torch.randn(1, 16, 2, 1, 1), torch.randn(1, 16, 1, 1, 1)]).shape
        torch.Size([1, 3, 9, 8, 8])
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        num_classes: int,
        in_channels: int = 1,
        decoder_channels: Sequence[int] | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        enc = [int(c) for c in encoder_channels]
        if len(enc) != 4:
            raise ValueError(f"expected 4 encoder maps (strides 2, 4, 8, 16), got channels {enc}")
        dec = [int(c) for c in decoder_channels] if decoder_channels is not None else [32, *enc[:3]]
        if len(dec) != 4:
            raise ValueError(f"decoder_channels are the widths at strides 1, 2, 4, 8: four values, got {dec}")
        self.encoder_channels, self.decoder_channels = enc, dec
        self.deep_supervision = deep_supervision
        self.stem = ResBlock3d(in_channels, dec[0])  # full-resolution skip from the image
        self.skips = nn.ModuleList(ResBlock3d(enc[i], dec[i + 1]) for i in range(3))  # strides 2, 4, 8
        self.bottleneck = ResBlock3d(enc[3], enc[3])  # stride 16
        ups_in = [enc[3], dec[3], dec[2], dec[1]]
        ups_out = [dec[3], dec[2], dec[1], dec[0]]  # to strides 8, 4, 2, 1
        self.ups = nn.ModuleList(UpBlock3d(i, o) for i, o in zip(ups_in, ups_out))
        self.head = nn.Conv3d(dec[0], num_classes, 1)
        # deep supervision heads at strides 2 and 4 (full resolution first in the output list)
        self.ds_heads = nn.ModuleList(nn.Conv3d(c, num_classes, 1) for c in dec[1:3]) if deep_supervision else None

    def forward(self, image: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if len(feats) != 4:
            raise ValueError(f"expected 4 encoder maps, got {len(feats)}")
        if image.dim() != 5:
            raise ValueError(f"image must be (B, C, D, H, W), got shape {tuple(image.shape)}")
        want = [(image.shape[0], *(-(-s // 2 ** (i + 1)) for s in image.shape[2:])) for i in range(4)]
        got = [(f.shape[0], *f.shape[2:]) if f.dim() == 5 else tuple(f.shape) for f in feats]
        if got != want:  # features of another volume (or batch) would be cropped to fit, silently
            raise ValueError(f"encoder maps (batch, D, H, W) {got} do not belong to the image {tuple(image.shape)}: "
                             f"strides 2, 4, 8, 16 need {want}; pass the maps the encoder made from this image")
        skips = [self.stem(image), *(blk(f) for blk, f in zip(self.skips, feats[:3]))]  # strides 1, 2, 4, 8
        x = self.bottleneck(feats[3])
        outs = []
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
            outs.append(x)  # strides 8, 4, 2, 1
        logits = self.head(outs[-1])
        if self.ds_heads is None or not self.training:
            return logits
        low = [h(o) for h, o in zip(self.ds_heads, (outs[2], outs[1]))]  # strides 2, 4
        return [logits, *low]
