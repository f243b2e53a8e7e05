"""3D encoders for volumes: SegMamba and a VMamba-style hierarchical 3D encoder.

Both take (B, in_chans, D, H, W) volumes of any size and return four 5D feature maps
(B, C_i, ceil(D / r_i), ceil(H / r_i), ceil(W / r_i)) with reductions r = (2, 4, 8, 16) and
channels (48, 96, 192, 384) for the tiny configs. Every stride-2 step yields ceil(n / 2) (odd
sizes are zero-padded at the end), so nothing is cropped and no divisibility rule applies; a
decoder that upsamples by 2 must crop to the skip's size.

``segmamba_tiny`` follows SegMamba (Xing et al. 2024, "SegMamba: Long-range Sequential Modeling
Mamba For 3D Medical Image Segmentation"; ge-xing/SegMamba ``model_segmamba/segmamba.py`` and its
``mamba_simple.py`` with ``bimamba_type="v3"``, read for the configuration):
stem conv 7^3 stride 2 -> per stage [downsample (InstanceNorm + conv 2^3 stride 2), GSC, 2 x
(x + ToM(LayerNorm(x)))] -> per output InstanceNorm + MLP (1^3 conv C -> 2C -> C, GELU).
The tri-oriented Mamba (forward, reverse, inter-slice) is
:class:`~mamba_dense.layers.seq_mixer.RouteMamba` with ``routes.segmamba3d(d, h, w)`` (K = 3, own
conv/x_proj/dt_proj/A/D per route), one scan call, outputs summed (no division, as released).

``vmamba3d_tiny`` carries VMamba v2 (``forward_type="v05_noz"``, d_state 1, ssm_ratio 2, 3-wide
depthwise conv without bias, MLP ratio 4) to volumes: a stride-2 conv stem, SS3D mixers over the
six axis orders ``routes.axes3d`` (each axis fastest, forward and reversed), 3^3 stride-2 conv +
LayerNorm downsampling and a LayerNorm per output. It is this project's design, not a published
model.

Deviations from the SegMamba release:
- The inter-slice route is computed from the actual depth; the release hard-codes
  ``nslices = (64, 32, 16, 8)`` and is only an inter-slice scan for 128^3 inputs.
- InstanceNorm is computed as ``group_norm`` with one group per channel (same numbers) so that a
  1 x 1 x 1 map at stride 16 (a 16^3 input) is allowed; torch's InstanceNorm refuses it.
- Odd sizes are padded before the 2^3 downsampling convs (the release needs multiples of 16).
- Optional stochastic depth (``drop_path_rate``; the release has none).
- Training from scratch: every route's dt bias gets Mamba's init (softplus(bias) log-uniform in
  [1e-3, 0.1]); the release's ``dt_proj_b`` / ``dt_proj_s`` keep PyTorch's default Linear init.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from mamba_dense.kernels import routes as _routes
from mamba_dense.kernels.instance_norm import instance_norm_act
from mamba_dense.layers.block import VSSBlock
from mamba_dense.layers.seq_mixer import RouteMamba
from mamba_dense.layers.ssm import SSMCore

from ._builder import checkpoint_tensors
from ._registry import register_encoder

__all__ = [
    "SegMambaEncoder",
    "VMamba3dEncoder",
    "GSC",
    "ToMLayer",
    "SS3D",
    "segmamba_tiny",
    "vmamba3d_tiny",
    "VOLUMETRIC_ENCODERS",
    "create_volumetric_encoder",
    "segmamba_checkpoint_filter",
]

_segmamba_route = _routes.cached_route(maxsize=64)(_routes.segmamba3d)


def _segmamba_inverse(d: int, h: int, w: int) -> torch.Tensor:
    """``routes.inverse`` of SegMamba's routes for a d x h x w map (a route builder for device_route)."""
    return _routes.inverse(_segmamba_route(d, h, w), d * h * w)


_SEGMAMBA_KEYS = (_routes.source_key(_segmamba_route), _routes.source_key(_segmamba_inverse))
_axes3d_route = _routes.cached_route(maxsize=64)(_routes.axes3d)


def _take(num: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's index rule: None = all, int n = last n, sequence = those (negative from the end)."""
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"last-n indices must be in 1..{num}, got {indices}")
        return list(range(num - indices, num))
    out = [i + num if i < 0 else i for i in indices]
    if any(not 0 <= i < num for i in out):
        raise ValueError(f"feature indices must lie in [-{num}, {num}), got {list(indices)}")
    return out


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D, H, W, C) contiguous."""
    return x.permute(0, 2, 3, 4, 1).contiguous()


def _to_maps(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, C, D, H, W) contiguous."""
    return x.permute(0, 4, 1, 2, 3).contiguous()


def _pad_even(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad D, H, W of (B, C, D, H, W) at the end to even sizes."""
    d, h, w = x.shape[-3:]
    if d % 2 or h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2, 0, d % 2))
    return x


# ---------------------------------------------------------------------------------------------
# blocks


class InstanceNorm3d(nn.Module):
    """Parameter-free instance norm of (B, C, D, H, W), valid for a single voxel too (gives 0).

    ``forward(x, act)`` fuses an activation ("none", "relu", "leaky_relu"). CUDA tensors run the
    split-reduction Triton kernels of ``mamba_dense.kernels.instance_norm`` (statistics in fp32, I/O in
    x's dtype); CPU tensors ``torch.group_norm`` with one group per channel (same numbers).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels, self.eps = num_channels, eps

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        return instance_norm_act(x, None, None, self.eps, act)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class GSC(nn.Module):
    """SegMamba's gated spatial convolution, channels-first.

    ``x + ReLU(IN(conv1(ReLU(IN(conv3(ReLU(IN(conv3(x))))) + ReLU(IN(conv1(x)))))))``: a 3^3-3^3
    branch and a 1^3 branch are summed, projected by a 1^3 conv, and added to the input.

    Shapes: (B, C, D, H, W) -> same.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(dim, dim, 3, 1, 1)
        self.norm = InstanceNorm3d(dim)
        self.proj2 = nn.Conv3d(dim, dim, 3, 1, 1)
        self.norm2 = InstanceNorm3d(dim)
        self.proj3 = nn.Conv3d(dim, dim, 1, 1, 0)
        self.norm3 = InstanceNorm3d(dim)
        self.proj4 = nn.Conv3d(dim, dim, 1, 1, 0)
        self.norm4 = InstanceNorm3d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.norm(self.proj(x), act="relu")  # = ReLU(IN(.)), fused
        x1 = self.norm2(self.proj2(x1), act="relu")
        x2 = self.norm3(self.proj3(x), act="relu")
        return x + self.norm4(self.proj4(x1 + x2), act="relu")


class ToMLayer(nn.Module):
    """``x + DropPath(ToM(LayerNorm(x)))`` on channels-last volumes, ToM = 3-route RouteMamba.

    Shapes: (B, D, H, W, C) -> same.
    """

    def __init__(
        self, dim: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = RouteMamba(dim, num_routes=3, d_state=d_state, d_conv=d_conv, expand=expand, divide_out=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = x.shape
        # routes and their inverses as cached device tensors looked up by string keys: no graph
        # break under torch.compile (see routes.device_route)
        route, inv = (_routes.device_route(key, D, H, W, device=x.device) for key in _SEGMAMBA_KEYS)
        y = self.mamba(self.norm(x).reshape(B, D * H * W, C), route, inv)
        return x + self.drop_path(y.view(B, D, H, W, C))


class MlpChannel(nn.Module):
    """1^3 conv C -> hidden, GELU, 1^3 conv hidden -> C (SegMamba's output MLP), channels-first."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Downsample3d(nn.Module):
    """SegMamba's transition: InstanceNorm, zero-pad to even, conv 2^3 stride 2 -> ceil(n / 2)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = InstanceNorm3d(dim)
        self.conv = nn.Conv3d(dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_pad_even(self.norm(x)))


class SS3D(nn.Module):
    """VMamba-v2-style 3D selective-scan mixer, channels-last.

    in_proj (no bias) -> depthwise conv k^3 + SiLU -> SSMCore over ``route_fn(d, h, w)`` (default the
    six axis orders, merged in the kernel) -> LayerNorm -> out_proj (no bias).

    Args:
        dim: width C. d_state: N (1). ssm_ratio: E = ssm_ratio * C (2). dt_rank: "auto" = ceil(C/16).
        d_conv: depthwise conv size (3; < 2 disables it). conv_bias: (False).
        route_fn: (d, h, w) -> (K, S) routes; num_routes: its K (6 for ``routes.axes3d``).

    Shapes: (B, D, H, W, C) -> same.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        route_fn: Callable[[int, int, int], torch.Tensor] | None = None,
        num_routes: int = 6,
    ) -> None:
        super().__init__()
        self.d_inner = E = int(ssm_ratio * dim)
        self.route_fn = route_fn or _axes3d_route
        self.route_key = _routes.source_key(self.route_fn)
        self.in_proj = nn.Linear(dim, E, bias=False)
        self.conv3d = (
            nn.Conv3d(E, E, d_conv, padding=(d_conv - 1) // 2, groups=E, bias=conv_bias) if d_conv > 1 else None
        )
        self.act = nn.SiLU()
        self.ssm = SSMCore(E, num_routes, d_state=d_state, dt_rank=dt_rank, d_model=dim)
        self.out_norm = nn.LayerNorm(E)
        self.out_proj = nn.Linear(E, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, _ = x.shape
        u = self.in_proj(x)
        if self.conv3d is not None:
            u = _to_tokens(self.conv3d(_to_maps(u)))
        u = self.act(u).reshape(B, D * H * W, self.d_inner)
        y = self.ssm(u, _routes.device_route(self.route_key, D, H, W, device=u.device), merge="sum")
        return self.out_proj(self.out_norm(y)).view(B, D, H, W, -1)


class ConvStem3d(nn.Module):
    """Conv 3^3 stride 2 (C/2) + LayerNorm + GELU + conv 3^3 (C) + LayerNorm: (B, in, D, H, W) ->
    (B, ceil(D/2), ceil(H/2), ceil(W/2), C), channels-last."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv3d(dim // 2, dim, 3, stride=1, padding=1)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(_to_tokens(self.conv1(x))))
        return self.norm2(_to_tokens(self.conv2(_to_maps(x))))


class ConvDownsample3d(nn.Module):
    """Conv 3^3 stride 2 + LayerNorm, channels-last: (B, D, H, W, C) -> (B, ceil(D/2), ..., C_out)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_to_tokens(self.conv(_to_maps(x))))


# ---------------------------------------------------------------------------------------------
# models


class _Volumetric(nn.Module):
    """Shared feature contract of the 3D encoders (subclasses define ``_stages``)."""

    feature_info: list[dict[str, Any]]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCDHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Multi-scale features (timm-style contract for volumes).

        Args:
            x: (B, in_chans, D, H, W), any size.
            indices: stages to take: None = all four, int n = last n, sequence = those.
            norm: accepted for the timm signature; stage outputs always pass their output norm
                (and, in SegMamba, the output MLP), as in the released dense models.
            stop_early: skip the stages after the last taken one.
            output_fmt: "NCDHW" (default) or "NDHWC".
            intermediates_only: return only the features.

        Returns:
            list of (B, C_i, ceil(D/r_i), ceil(H/r_i), ceil(W/r_i)) (or NDHWC), and, unless
            ``intermediates_only``, first the last stage's un-normalised output (B, C, d, h, w).
        """
        if output_fmt not in ("NCDHW", "NDHWC"):
            raise ValueError(f"output_fmt must be 'NCDHW' or 'NDHWC', got {output_fmt!r}")
        if x.dim() != 5:
            raise ValueError(
                f"expected a volume batch (B, {self.in_chans}, D, H, W), got {tuple(x.shape)}"
                + ("; add the batch dimension (x[None])" if x.dim() == 4 else "")
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected a volume batch (B, {self.in_chans}, D, H, W), got {tuple(x.shape)}; build the encoder "
                f"with in_chans={x.shape[1]} for other channel counts"
            )
        if min(x.shape[0], *x.shape[2:]) < 1:
            raise ValueError(
                f"expected at least one volume of at least 1 x 1 x 1 voxels (any D, H, W >= 1 works), got "
                f"(B, C, D, H, W) = {tuple(x.shape)}; drop empty volumes and batches before the encoder"
            )
        take = _take(len(self.feature_info), indices)
        last = max(take) if stop_early else len(self.feature_info) - 1
        feats = []
        x = self._begin(x)
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take:
                f = self._out(i, x)  # channels-first
                feats.append(_to_tokens(f) if output_fmt == "NDHWC" else f)
        if intermediates_only:
            return feats
        return self._final(x), feats

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_chans, D, H, W) -> the four feature maps (NCDHW)."""
        return self.forward_intermediates(x, intermediates_only=True)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_features(x)


class SegMambaEncoder(_Volumetric):
    """SegMamba's encoder (GSC + tri-oriented Mamba), multi-scale 5D features.

    Args:
        in_chans: volume channels (1 for CT, 4 for BraTS MRI).
        dims: stage widths (48, 96, 192, 384). depths: ToM layers per stage (2, 2, 2, 2).
        d_state, d_conv, expand: Mamba settings (16, 4, 2). mlp_ratio: output MLP width ratio (2).
        drop_path_rate: stochastic depth over the ToM layers (0 as released).
        channels_last: keep the maps in ``torch.channels_last_3d`` memory (NDHWC) from the stem on:
            the token view of a map is then free and cuDNN convolves NDHWC directly, without the
            NCDHW copies around every Mamba stage (False: NCDHW maps; the same values either way).
            H100, segmamba_tiny at 128^3: no gain alone (160.8 vs 158.7 ms per step); 150.5 ms with the
            decoder and the input in channels_last_3d too (``benchmarks/RESULTS.md``).

    Shapes: (B, in_chans, D, H, W) -> [(B, dims[i], ceil(D/2^(i+1)), ceil(H/2^(i+1)), ceil(W/2^(i+1)))].

    Example:
        >>> m = SegMambaEncoder(in_chans=1, dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), d_state=2)
        >>> [tuple(f.shape) for f in m(torch.randn(1, 1, 9, 12, 16))]
        [(1, 8, 5, 6, 8), (1, 16, 3, 3, 4), (1, 16, 2, 2, 2), (1, 16, 1, 1, 1)]
    """

    def __init__(
        self,
        in_chans: int = 1,
        dims: tuple[int, ...] = (48, 96, 192, 384),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        mlp_ratio: float = 2.0,
        drop_path_rate: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"dims {dims} and depths {depths} must have the same length")
        n = len(dims)
        self.in_chans, self.dims, self.channels_last = in_chans, tuple(dims), channels_last
        self.stem = nn.Conv3d(in_chans, dims[0], kernel_size=7, stride=2, padding=3)
        self.downsamples = nn.ModuleList(Downsample3d(dims[i], dims[i + 1]) for i in range(n - 1))
        self.gscs = nn.ModuleList(GSC(d) for d in dims)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        for i, (d, k) in enumerate(zip(dims, depths)):
            start = sum(depths[:i])
            self.stages.append(nn.ModuleList(ToMLayer(d, d_state, d_conv, expand, dpr[start + j]) for j in range(k)))
        self.out_norms = nn.ModuleList(InstanceNorm3d(d) for d in dims)
        self.mlps = nn.ModuleList(MlpChannel(d, int(mlp_ratio * d)) for d in dims)
        self.feature_info = [dict(num_chs=d, reduction=2 ** (i + 1), module=f"mlps.{i}") for i, d in enumerate(dims)]

    def _begin(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.stem(x)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i > 0:
            x = self.downsamples[i - 1](x)
        x = _to_tokens(self.gscs[i](x))  # a view when the maps are channels-last
        for layer in self.stages[i]:
            x = layer(x)
        return x.permute(0, 4, 1, 2, 3) if self.channels_last else _to_maps(x)

    def _out(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.mlps[i](self.out_norms[i](x))

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return x


class VMamba3dEncoder(_Volumetric):
    """VMamba-style hierarchical 3D encoder (SS3D over six axis orders + MLP blocks).

    Args:
        in_chans: volume channels. dims: (48, 96, 192, 384). depths: (2, 2, 2, 2).
        d_state: 1. ssm_ratio: 2. mlp_ratio: 4. drop_path_rate: stochastic depth.

    Shapes: (B, in_chans, D, H, W) -> [(B, dims[i], ceil(D/2^(i+1)), ceil(H/2^(i+1)), ceil(W/2^(i+1)))].

    Example:
        >>> m = VMamba3dEncoder(in_chans=2, dims=(8, 16, 16, 16), depths=(1, 1, 1, 1))
        >>> [tuple(f.shape) for f in m(torch.randn(1, 2, 9, 12, 16))]
        [(1, 8, 5, 6, 8), (1, 16, 3, 3, 4), (1, 16, 2, 2, 2), (1, 16, 1, 1, 1)]
    """

    def __init__(
        self,
        in_chans: int = 1,
        dims: tuple[int, ...] = (48, 96, 192, 384),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"dims {dims} and depths {depths} must have the same length")
        n = len(dims)
        self.in_chans, self.dims = in_chans, tuple(dims)
        self.stem = ConvStem3d(in_chans, dims[0])
        self.downsamples = nn.ModuleList(ConvDownsample3d(dims[i], dims[i + 1]) for i in range(n - 1))
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        for i, (d, k) in enumerate(zip(dims, depths)):
            start = sum(depths[:i])
            self.stages.append(
                nn.Sequential(
                    *(
                        VSSBlock(d, SS3D(d, d_state=d_state, ssm_ratio=ssm_ratio), mlp_ratio, dpr[start + j])
                        for j in range(k)
                    )
                )
            )
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.feature_info = [
            dict(num_chs=d, reduction=2 ** (i + 1), module=f"out_norms.{i}") for i, d in enumerate(dims)
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """VMamba's init: trunc-normal(0.02) linear weights, zero biases (SSM parameters keep Mamba's)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _begin(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)  # channels-last from here on

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i > 0:
            x = self.downsamples[i - 1](x)
        return self.stages[i](x)

    def _out(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return _to_maps(self.out_norms[i](x))

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return _to_maps(x)


# ---------------------------------------------------------------------------------------------
# checkpoint filter


def segmamba_checkpoint_filter(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SegMamba checkpoint (whole model or its ``MambaEncoder``) -> SegMambaEncoder keys.

    Keeps the encoder (``vit.*`` in the whole model; decoder keys are dropped), maps
    ``downsample_layers.0.0`` -> ``stem``, ``downsample_layers.i.1`` -> ``downsamples.{i-1}.conv``,
    and stacks each ToM layer's forward / backward / inter-slice tensors (suffixes "", "_b", "_s";
    ``A_log``/``A_b_log``/``A_s_log``) into the route-indexed RouteMamba parameters. A state dict
    already in our naming passes through.
    """
    # (the release's trainer saves a DistributedDataParallel model: "module." before every key)
    sd = checkpoint_tensors(state_dict)
    if any(k.endswith("mamba.conv1d_weight") for k in sd):  # already ours
        return dict(sd)
    if any(k.startswith("vit.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("vit.")}
    sufs = ("", "_b", "_s")
    out: dict[str, torch.Tensor] = {}
    mixers: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("downsample_layers."):
            _, i, j, rest = k.split(".", 3)
            out[("stem." if i == "0" else f"downsamples.{int(i) - 1}.conv.") + rest] = v
        elif ".mamba." in k:
            head, rest = k.split(".mamba.", 1)
            mixers.setdefault(head + ".mamba.", {})[rest] = v
        else:
            out[k] = v
    for p, m in mixers.items():
        need = [f"{n}{s}.{w}" for n in ("conv1d", "dt_proj") for s in sufs for w in ("weight", "bias")]
        missing = [k for k in ("in_proj.weight", "out_proj.weight", *need, "A_log", "A_b_log", "A_s_log", "D", "D_b", "D_s",
                               *(f"x_proj{s}.weight" for s in sufs)) if k not in m]
        if missing:
            raise ValueError(
                f"segmamba_checkpoint_filter: {p.rstrip('.')} lacks {missing[:6]}: not a SegMamba checkpoint with the three "
                "scan directions of the release (forward, backward '_b', inter-slice '_s'). Fix: pass the official "
                "SegMamba checkpoint (model_segmamba, mamba 'v3')")
        out[p + "in_proj.weight"] = m["in_proj.weight"]
        out[p + "out_proj.weight"] = m["out_proj.weight"]
        out[p + "conv1d_weight"] = torch.stack([m[f"conv1d{s}.weight"][:, 0] for s in sufs])
        out[p + "conv1d_bias"] = torch.stack([m[f"conv1d{s}.bias"] for s in sufs])
        out[p + "ssm.x_proj_weight"] = torch.stack([m[f"x_proj{s}.weight"] for s in sufs])
        out[p + "ssm.dt_projs_weight"] = torch.stack([m[f"dt_proj{s}.weight"] for s in sufs])
        out[p + "ssm.dt_projs_bias"] = torch.stack([m[f"dt_proj{s}.bias"] for s in sufs])
        out[p + "ssm.A_logs"] = torch.stack([m["A_log"], m["A_b_log"], m["A_s_log"]])
        out[p + "ssm.Ds"] = torch.stack([m["D"], m["D_b"], m["D_s"]])
    return out


# ---------------------------------------------------------------------------------------------
# registry


def _no_download(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(
            f"{name}: weights are never downloaded; build with pretrained=False and load a file, e.g. "
            "model.load_state_dict(segmamba_checkpoint_filter(torch.load(path, map_location='cpu')))"
        )


@register_encoder(spatial_dims=3)
def segmamba_tiny(pretrained: bool = False, in_chans: int = 1, **kwargs: Any) -> SegMambaEncoder:
    """SegMamba encoder as released: dims (48, 96, 192, 384), depths (2, 2, 2, 2), d_state 16."""
    _no_download("segmamba_tiny", pretrained)
    return SegMambaEncoder(in_chans=in_chans, **dict(dict(dims=(48, 96, 192, 384), depths=(2, 2, 2, 2)), **kwargs))


@register_encoder(spatial_dims=3)
def vmamba3d_tiny(pretrained: bool = False, in_chans: int = 1, **kwargs: Any) -> VMamba3dEncoder:
    """VMamba-style 3D encoder: dims (48, 96, 192, 384), depths (2, 2, 2, 2), d_state 1 (no released weights)."""
    _no_download("vmamba3d_tiny", pretrained)
    return VMamba3dEncoder(in_chans=in_chans, **dict(dict(dims=(48, 96, 192, 384), depths=(2, 2, 2, 2)), **kwargs))


VOLUMETRIC_ENCODERS: dict[str, Callable[..., _Volumetric]] = {
    "segmamba_tiny": segmamba_tiny,
    "vmamba3d_tiny": vmamba3d_tiny,
}


def create_volumetric_encoder(name: str, **kwargs: Any) -> _Volumetric:
    """Build a 3D encoder by name, e.g. ``create_volumetric_encoder("segmamba_tiny", in_chans=4)``.

    The variants are also in the package registry (``mamba_dense.encoders.create_encoder``,
    ``list_encoders(spatial_dims=3)``); they are not timm models (timm is 2D).
    """
    try:
        fn = VOLUMETRIC_ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown volumetric encoder {name!r}; available: {sorted(VOLUMETRIC_ENCODERS)}") from None
    return fn(**kwargs)
