"""VMamba (Liu et al., "VMamba: Visual State Space Model", NeurIPS 2024), dense-prediction form.

Released v2 design (``forward_type="v05_noz"``, MzeroMiko/VMamba ``vmamba_tiny_s1l8``,
``vmamba_small_s2l15``, ``vmamba_base_s2l15``):

- stem: 3x3/s2 conv (C/2) -> LN -> GELU -> 3x3/s2 conv (C) -> LN (:class:`~mamba_dense.layers.ConvStem`);
- downsample between stages: 3x3/s2 conv + LN (:class:`~mamba_dense.layers.ConvDownsample`);
- block: x + DropPath(SS2D(LN x)), x + DropPath(MLP_4x(LN x)) (:class:`~mamba_dense.layers.VSSBlock`);
- SS2D: 1x1 in_proj (no gate, no bias), 3x3 depthwise conv (no bias) + SiLU, the 4-route cross
  scan (``routes.cross2d``) with per-route x_proj (dt_rank = ceil(C/16), d_state), dt_proj with
  bias, A_logs, Ds, merged in the kernel, out LayerNorm, out_proj (no bias);
- init: trunc_normal(0.02) linears, A_logs = log(1..N), Ds = 1, dt bias = softplus^-1(logU[1e-3, 0.1]).

=================  ======  =============  =======  =========  ==========================
variant            dims    depths         d_state  ssm_ratio  params (1000-class head)
=================  ======  =============  =======  =========  ==========================
vmamba_tiny        96..    2-2-8-2        1        1.0        30,249,064 (paper: 30M)
vmamba_small       96..    2-2-15-2       1        2.0        50,147,752 (paper: 50M)
vmamba_base        128..   2-2-15-2       1        2.0        88,557,800 (paper: 89M)
vmamba_*_v0        vanilla v0: d_state 16, ssm_ratio 2, SiLU gate, no MLP, 4x4 patch embed,
                   patch merging, depths 2-2-9-2 (T) / 2-2-27-2 (S, B): T 22,893,448 (paper
                   22.9M), S 44,417,416 (44M), B 76,254,056 (76M)
=================  ======  =============  =======  =========  ==========================

Options: ``num_registers`` (Mamba(R) register tokens per stage, spliced into every route by
``routes.with_registers`` and dropped at the end of each stage; ``forward_intermediates(...,
return_registers=True)`` returns them), ``feature_norms`` (a LayerNorm per returned feature map, as
the official dense backbones have), ``set_grad_checkpointing()``.

All maps are channels-last inside; ``forward_intermediates`` returns NCHW by default. Any input
size works (see ``_features.py``). Official checkpoints load through :func:`checkpoint_filter_fn`
(``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``).

Example:
    >>> import torch, mamba_dense.encoders as enc
    >>> m = enc.create_encoder("vmamba_tiny", depths=(1, 1, 1, 1), dims=16, num_classes=0)
    >>> [f.shape[1:] for f in m.forward_intermediates(torch.randn(1, 3, 63, 45), intermediates_only=True)]
    [torch.Size([16, 16, 12]), torch.Size([32, 8, 6]), torch.Size([64, 4, 3]), torch.Size([128, 2, 2])]
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.nn as nn

from mamba_dense.layers import SS2D, ConvDownsample, ConvStem, PatchEmbed, PatchMerging, VSSBlock

from ._builder import build_encoder, encoder_cfg
from ._features import EncoderStage, HierarchicalEncoder
from ._registry import register_encoder

__all__ = ["VMamba", "checkpoint_filter_fn"]


class VMamba(HierarchicalEncoder):
    """Hierarchical VMamba encoder (4 stages at strides 4, 8, 16, 32).

    Args:
        depths: blocks per stage.
        dims: channels per stage, or an int C for (C, 2C, 4C, 8C).
        in_chans: image channels.
        num_classes: classifier outputs (0 = no head).
        d_state, ssm_ratio, dt_rank, d_conv, conv_bias, gate: SS2D settings (see :class:`~mamba_dense.layers.SS2D`).
        mlp_ratio: MLP width factor (0 = no MLP branch).
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        stem: "conv" (two 3x3/s2 convs, v2) or "patch" (4x4/s4 conv, v0).
        downsample: "conv" (3x3/s2 conv + LN, v2) or "merge" (patch merging, v0).
        norm_eps: epsilon of every LayerNorm.
        feature_norms: a LayerNorm per returned feature map (the official dense backbones' outnorms).
        num_registers: Mamba(R) register tokens per stage (0 = none); see :class:`EncoderStage`.
        output_stride: only 32 is supported (the stages always downsample).
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
        global_pool: "avg" (default) or "" (no pooling: the head sees the (B, H, W, C) map).
        **mixer_kwargs: further arguments of the token mixer (e.g. SS2D's ``dropout``); any other
            name raises a TypeError listing the accepted ones.

    Shapes: forward (B, in_chans, H, W) -> (B, num_classes); see ``forward_intermediates`` for features.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: int | Sequence[int] = 96,
        in_chans: int = 3,
        num_classes: int = 1000,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        gate: bool = False,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        stem: str = "conv",
        downsample: str = "conv",
        norm_eps: float = 1e-5,
        feature_norms: bool = False,
        num_registers: int = 0,
        output_stride: int = 32,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        self._check_mixer_kwargs(mixer_kwargs)
        if output_stride != 32:
            raise ValueError(
                f"{type(self).__name__} supports output_stride=32 only (got {output_stride}); its stages always downsample"
            )
        if len(depths) != 4:
            raise ValueError(f"depths must list 4 stages, got {tuple(depths)}")
        dims = [int(dims) * 2**i for i in range(4)] if isinstance(dims, int) else [int(d) for d in dims]
        self.depths = tuple(int(d) for d in depths)
        self.ssm_cfg = dict(
            d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias, gate=gate,
            norm_eps=norm_eps, **mixer_kwargs,
        )
        if stem == "conv":
            self.stem = ConvStem(in_chans, dims[0], norm_eps=norm_eps)
        elif stem == "patch":
            self.stem = PatchEmbed(in_chans, dims[0], patch_size=4, norm_eps=norm_eps)
        else:
            raise ValueError(f"stem must be 'conv' or 'patch', got {stem!r}")
        if downsample not in ("conv", "merge"):
            raise ValueError(f"downsample must be 'conv' or 'merge', got {downsample!r}")
        down_cls = ConvDownsample if downsample == "conv" else PatchMerging

        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()
        stages, k = [], 0
        for i, (depth, dim) in enumerate(zip(self.depths, dims)):
            blocks = []
            for _ in range(depth):
                blocks.append(VSSBlock(dim, self._make_mixer(dim, k), mlp_ratio=mlp_ratio, drop_path=dpr[k], norm_eps=norm_eps))
                k += 1
            down = down_cls(dims[i - 1], dim, norm_eps=norm_eps) if i > 0 else None
            stages.append(EncoderStage(blocks, down, dim=dim, num_registers=num_registers))
        self.stages = nn.ModuleList(stages)
        self._init_head(dims, num_classes, in_chans, feature_norms, norm_eps, drop_rate, global_pool)
        self.apply(self._init_weights)

    # the mixer class whose keyword arguments ``**mixer_kwargs`` may hold, and the ones the
    # encoder sets itself
    _mixer_cls: type = SS2D
    _mixer_own = ("dim", "num_routes", "route_fn")

    def _check_mixer_kwargs(self, mixer_kwargs: dict[str, Any]) -> None:
        import inspect

        accepted = set(inspect.signature(self._mixer_cls.__init__).parameters) - {"self", "args", "kwargs"}
        if issubclass(self._mixer_cls, SS2D):  # subclasses pass their **kwargs on to SS2D
            accepted |= set(inspect.signature(SS2D.__init__).parameters)
        accepted -= {"self", *self._mixer_own}
        unknown = sorted(set(mixer_kwargs) - accepted)
        if unknown:
            own = sorted({n for c in type(self).__mro__ if issubclass(c, VMamba)
                          for n in inspect.signature(c.__init__).parameters} - {"self", "kwargs", "mixer_kwargs"})
            raise TypeError(f"{type(self).__name__}: unknown argument(s) {unknown}. Encoder arguments: {own}; "
                            f"token-mixer arguments: {sorted(accepted)}")

    def _make_mixer(self, dim: int, block_idx: int) -> nn.Module:
        """The token mixer of block ``block_idx`` (counted over all stages); subclasses override."""
        return SS2D(dim, **self.ssm_cfg)


# ---------------------------------------------------------------------------- checkpoint filter
_SSM_PARAMS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def _rename_official(k: str, conv_stem: bool, conv_down: bool) -> str:
    """Official VSSM key -> our key (unknown keys come back unchanged, for the strict check)."""
    # legacy VMamba v0 names (renamed by VSSM._load_from_state_dict in the official code)
    k = k.replace("patch_embed.proj.", "patch_embed.0.").replace("patch_embed.norm.", "patch_embed.2.")
    k = re.sub(r"(layers\.\d+\.blocks\.\d+)\.ln_1\.", r"\1.norm.", k)
    k = re.sub(r"(layers\.\d+\.blocks\.\d+)\.self_attention\.", r"\1.op.", k)
    m = re.match(r"patch_embed\.(\d+)\.(.*)", k)
    if m:
        idx, rest = int(m.group(1)), m.group(2)
        names = {0: "conv1", 2: "norm1", 5: "conv2", 7: "norm2"} if conv_stem else {0: "proj", 2: "norm"}
        return f"stem.{names[idx]}.{rest}" if idx in names else k  # unknown: left for the strict check
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if conv_down:
            rest = re.sub(r"^1\.", "conv.", re.sub(r"^3\.", "norm.", rest))
        return f"stages.{i + 1}.downsample.{rest}"
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", k)
    if m:
        i, j, rest = m.groups()
        for p in _SSM_PARAMS:
            rest = re.sub(rf"^op\.{p}$", f"op.ssm.{p}", rest)
        rest = rest.replace("op.multi_scan.attn.", "op.attn.")  # LocalMamba's SCAttn
        return f"stages.{i}.blocks.{j}.{rest}"
    m = re.match(r"outnorm(\d+)\.(.*)", k)
    if m:
        return f"feature_norms.{m.group(1)}.{m.group(2)}"
    if k.startswith("classifier.norm."):
        return "norm." + k[len("classifier.norm."):]
    if k.startswith("classifier.head."):
        return "head." + k[len("classifier.head."):]
    return k


def checkpoint_filter_fn(
    state_dict: dict[str, Any], model: nn.Module, fill_missing: bool = True
) -> dict[str, torch.Tensor]:
    """Map an official VMamba / LocalMamba checkpoint (``VSSM`` or ``Backbone_VSSM`` keys) onto ``model``.

    Handles the wrappers ``{"model": ...}`` / ``{"state_dict": ...}`` and ``backbone.`` prefixes
    (mmseg/mmdet checkpoints; their decoder keys are left out), the stem/downsample index names,
    the legacy v0 names (``patch_embed.proj``, ``ln_1``, ``self_attention``), SS2D's per-route
    tensors stored flat ((K*D, N) A_logs, (K*D,) Ds -> (K, D, N), (K, D)) and Linear2d weights
    stored as 1x1 convs. A state dict already in our naming passes through unchanged.

    Args:
        fill_missing: copy the model's own per-stage feature norms into the result when the
            checkpoint has none (classification checkpoints), so that timm's strict loading
            succeeds; ``mamba_dense.convert`` passes False and reports them instead.
    """
    from ._builder import unwrap_checkpoint

    sd, _ = unwrap_checkpoint(state_dict)
    if any(k.startswith("stages.") for k in sd):
        return sd
    conv_stem = isinstance(getattr(model, "stem", None), ConvStem)
    conv_down = any(isinstance(getattr(s, "downsample", None), ConvDownsample) for s in getattr(model, "stages", []))
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        nk = _rename_official(k, conv_stem, conv_down)
        t = target.get(nk)
        if t is not None and tuple(v.shape) != tuple(t.shape) and v.numel() == t.numel():
            v = v.reshape(t.shape)
        out[nk] = v
    if fill_missing:
        for k, v in target.items():  # dense-only additions absent from classification checkpoints
            if k.startswith("feature_norms.") and k not in out:
                out[k] = v
    return out


# ---------------------------------------------------------------------------- cfgs / variants
default_cfgs = {
    "vmamba_tiny": encoder_cfg(),
    "vmamba_small": encoder_cfg(),
    "vmamba_base": encoder_cfg(),
    "vmamba_tiny_v0": encoder_cfg(first_conv="stem.proj"),
    "vmamba_small_v0": encoder_cfg(first_conv="stem.proj"),
    "vmamba_base_v0": encoder_cfg(first_conv="stem.proj"),
}

_V2 = dict(d_state=1, dt_rank="auto", d_conv=3, conv_bias=False, gate=False, mlp_ratio=4.0, stem="conv", downsample="conv")
_V0 = dict(
    d_state=16, ssm_ratio=2.0, dt_rank="auto", d_conv=3, conv_bias=True, gate=True, mlp_ratio=0.0,
    stem="patch", downsample="merge",
)


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs: Any) -> VMamba:
    return build_encoder(VMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_encoder
def vmamba_tiny(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-T (v05_noz, ``vmamba_tiny_s1l8``): 30.2M params, 4.9 GFLOPs at 224."""
    args = dict(_V2, depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny", pretrained, **dict(args, **kwargs))


@register_encoder
def vmamba_small(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-S (v05_noz, ``vmamba_small_s2l15``): 50M params."""
    args = dict(_V2, depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small", pretrained, **dict(args, **kwargs))


@register_encoder
def vmamba_base(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-B (v05_noz, ``vmamba_base_s2l15``): 89M params."""
    args = dict(_V2, depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6)
    return _create_vmamba("vmamba_base", pretrained, **dict(args, **kwargs))


@register_encoder
def vmamba_tiny_v0(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Vanilla VMamba-T (v0): d_state 16, ssm_ratio 2, gated SS2D, no MLP, depths 2-2-9-2."""
    args = dict(_V0, depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_v0", pretrained, **dict(args, **kwargs))


@register_encoder
def vmamba_small_v0(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Vanilla VMamba-S (v0): depths 2-2-27-2."""
    args = dict(_V0, depths=(2, 2, 27, 2), dims=96, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small_v0", pretrained, **dict(args, **kwargs))


@register_encoder
def vmamba_base_v0(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """Vanilla VMamba-B (v0): dims 128, depths 2-2-27-2."""
    args = dict(_V0, depths=(2, 2, 27, 2), dims=128, drop_path_rate=0.5)
    return _create_vmamba("vmamba_base_v0", pretrained, **dict(args, **kwargs))
