"""UPerNet decoder (PSP pooling + FPN fusion) and the FCN auxiliary head.

Both follow mmseg's `UPerHead` / `FCNHead` of the ADE20K recipe used by the VMamba,
LocalMamba and Swin papers: 512 channels, pool scales (1, 2, 3, 6), dropout 0.1 before the
classifier; auxiliary FCN on the stride-16 map with 256 channels and one 3x3 conv.

NOTE why our own UPerNet and not smp's `UPerNetDecoder` (smp 0.6):
- its PSP branch for pool size 1 normalizes a (B, C, 1, 1) map with BatchNorm, so training at
  batch size 1 raises "Expected more than 1 value per channel when training";
- `use_norm="layernorm"` builds `nn.LayerNorm(C)`, which normalizes the last axis of an NCHW
  map (W, not C): it fails unless W == C and is wrong when it runs; the PSP bottleneck
  ignores `use_norm` altogether (hard-coded BatchNorm);
- it LayerNorms the encoder features first (not in the recipe) and expects two dummy
  full/half-resolution features in front of the stride-4 map.

Batch-size-1 choice: the default norm stays BatchNorm (the recipe; use
`Trainer(sync_batchnorm=True)` for SyncBN on several GPUs). Only the pooled PSP branches use
`PooledBatchNorm2d`, which, when a batch holds a single value per channel (batch 1, pool 1),
normalizes with its running statistics instead of failing; with more values it is plain
BatchNorm. GroupNorm (`norm="groupnorm"`) is batch-independent everywhere and is the option
for tiny batches; a correct channels LayerNorm is `norm="layernorm"`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mamba_dense.layers.resize import resize_bilinear
from ._checks import check_feature_maps, check_positive

NORMS = ("batchnorm", "groupnorm", "layernorm", "none")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that falls back to running statistics when a batch has one value per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            # NOTE: a variance cannot be estimated from one value; normalize like eval mode and
            # leave the running statistics untouched.
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def make_norm(norm: str, channels: int, pooled: bool = False) -> nn.Module:
    """Normalization layer by name: one of `NORMS`."""
    if norm == "batchnorm":
        return PooledBatchNorm2d(channels) if pooled else nn.BatchNorm2d(channels)
    if norm == "groupnorm":
        # NOTE: >= 2 channels per group, so the 1x1 pooled PPM maps still have 2 values to normalize.
        groups = next((g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels // g >= 2), 1)
        return nn.GroupNorm(groups, channels)
    if norm == "layernorm":
        return LayerNorm2d(channels, eps=1e-6)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS}.")


class ConvNormAct(nn.Sequential):
    """Conv -> norm -> ReLU (mmcv's ConvModule)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, norm: str = "batchnorm", pooled: bool = False
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == "none"),
            make_norm(norm, out_channels, pooled=pooled),
            nn.ReLU(inplace=True),
        )


_POOL_CACHE: dict = {}


def _pool_matrix(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    """(n_out, n_in) averaging weights of adaptive pooling: bin i covers [floor(i n / s), ceil((i + 1) n / s)).

    Cached per (size, device, dtype), built outside inference mode (it is saved for backward)."""
    key = (n_in, n_out, str(device), dtype)
    m = _POOL_CACHE.get(key)
    if m is None:
        with torch.inference_mode(False):
            m = torch.zeros(n_out, n_in, dtype=torch.float64)
            for i in range(n_out):
                lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
                m[i, lo:hi] = 1.0 / (hi - lo)
            m = m.to(device=device, dtype=dtype)
        if len(_POOL_CACHE) > 256:
            _POOL_CACHE.clear()
        _POOL_CACHE[key] = m
    return m


class AdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two small matrix products, P_h @ x @ P_w^T.

    Same bins and values as PyTorch's adaptive average pooling, but its backward is a matrix
    product too: deterministic on CUDA, where ``adaptive_avg_pool2d_backward`` uses atomics and
    refuses to run under ``torch.use_deterministic_algorithms(True)`` (``--trainer.deterministic``).
    """

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = int(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.output_size
        ph = _pool_matrix(x.shape[-2], s, x.device, x.dtype)
        pw = _pool_matrix(x.shape[-1], s, x.device, x.dtype)
        return torch.matmul(torch.matmul(ph, x), pw.t())

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class UPerNetHead(nn.Module):
    """UPerNet: PSP on the coarsest map, top-down FPN, fusion of all levels at the finest stride.

    Args:
        in_channels: channels of the encoder maps, finest first (strides 4, 8, 16, 32).
        num_classes: output classes.
        channels: width of every decoder conv (512 in the mmseg recipe).
        pool_scales: PSP output sizes.
        norm: one of "batchnorm" (recipe), "groupnorm", "layernorm", "none".
        dropout: Dropout2d before the 1x1 classifier.

    Returns:
        logits (B, num_classes, H0, W0) at the resolution of the finest input map.

    Example:
        >>> head = UPerNetHead([96, 192, 384, 768], num_classes=150)
        >>> feats = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip([96, 192, 384, 768], [1, 2, 4, 8])]
        >>> head(feats).shape
        torch.Size([2, 150, 64, 64])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "batchnorm",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"UPerNetHead needs at least 2 feature maps, got in_channels={list(in_channels)}.")
        if norm not in NORMS:
            raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS}.")
        check_positive("UPerNetHead", num_classes=num_classes, channels=channels, pool_scales=list(pool_scales),
                       in_channels=list(in_channels))
        self.in_channels = [int(c) for c in in_channels]
        top = in_channels[-1]
        self.psp_branches = nn.ModuleList(
            nn.Sequential(AdaptiveAvgPool2d(s), ConvNormAct(top, channels, 1, norm, pooled=True)) for s in pool_scales
        )
        self.psp_bottleneck = ConvNormAct(top + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def psp(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [resize_bilinear(branch(x), size) for branch in self.psp_branches]
        return self.psp_bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        check_feature_maps("UPerNetHead", features, self.in_channels)
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.psp(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [resize_bilinear(x, size) for x in outs[1:]]
        fused = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary FCN head (mmseg `FCNHead`, num_convs=1, concat_input=False) on one feature map.

    Args:
        in_channels: channels of the map it reads (the stride-16 map in the recipe).
        num_classes: output classes.
        channels: conv width (256 in the recipe).
        num_convs: number of 3x3 ConvNormAct layers.
        norm: as in `UPerNetHead`.
        dropout: Dropout2d before the classifier.

    Returns:
        logits (B, num_classes, h, w) at the resolution of its input map.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        norm: str = "batchnorm",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        convs = [ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels if num_convs else in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))
