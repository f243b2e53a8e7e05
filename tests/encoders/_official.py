"""State dicts in the layouts of the official releases, written from their model code (key names and
shapes only; values are random): MzeroMiko/VMamba ``classification/models/vmamba.py`` (VSSM,
Backbone_VSSM, the legacy v0 names its ``_load_from_state_dict`` renames), hunto/LocalMamba
``lib/models/local_vmamba.py``, hustvl/Vim ``vim/models_mamba.py`` + ``seg/backbone/vim.py``,
wangf3014/Mamba-Reg ``models_mamba.py`` and ge-xing/SegMamba ``model_segmamba/segmamba.py``.

They are independent of our modules on purpose: the tests convert them and load them strictly.
Every function takes a ``device`` ("meta" for the full-size variants: shapes only).
"""

from __future__ import annotations

import math

import torch


class _Maker:
    def __init__(self, device: str = "cpu", seed: int = 0) -> None:
        self.sd: dict[str, torch.Tensor] = {}
        self.device = device
        self.g = torch.Generator().manual_seed(seed) if device != "meta" else None

    def __call__(self, key: str, *shape: int) -> None:
        if self.device == "meta":
            self.sd[key] = torch.empty(*shape, device="meta")
        else:
            self.sd[key] = torch.randn(*shape, generator=self.g)

    def ln(self, key: str, c: int) -> None:
        self(key + ".weight", c)
        self(key + ".bias", c)

    def linear(self, key: str, out: int, inp: int, bias: bool = True) -> None:
        self(key + ".weight", out, inp)
        if bias:
            self(key + ".bias", out)


def vssm(
    depths=(2, 2, 8, 2), dims=96, d_state=1, ssm_ratio=1.0, version="v2", head=1000, outnorms=False,
    local=False, linear2d_as_conv=False, device="cpu", seed=0,
) -> dict[str, torch.Tensor]:
    """VMamba ``VSSM``: version "v2" (vssm1: conv stem, 3x3 conv downsample, no-z SS2D, MLP),
    "v0" (vanilla: 4x4 patch embed, patch merging, gated SS2D, no MLP), "legacy" (v0 with the first
    release's names ``patch_embed.proj``, ``ln_1``, ``self_attention``, top-level ``norm``/``head``).
    ``local`` adds LocalMamba's SCAttn (``op.multi_scan.attn``); ``outnorms`` the dense backbone's
    per-stage norms (and no classifier when ``head=0``)."""
    put = _Maker(device, seed)
    C = [dims * 2**i for i in range(4)] if isinstance(dims, int) else list(dims)
    v2 = version == "v2"
    legacy = version == "legacy"
    if v2:
        h = C[0] // 2
        put("patch_embed.0.weight", h, 3, 3, 3); put("patch_embed.0.bias", h)
        put.ln("patch_embed.2", h)
        put("patch_embed.5.weight", C[0], h, 3, 3); put("patch_embed.5.bias", C[0])
        put.ln("patch_embed.7", C[0])
    else:
        pe = "patch_embed.proj" if legacy else "patch_embed.0"
        put(pe + ".weight", C[0], 3, 4, 4); put(pe + ".bias", C[0])
        put.ln("patch_embed.norm" if legacy else "patch_embed.2", C[0])
    for i, (depth, c) in enumerate(zip(depths, C)):
        di, R, N, K = int(ssm_ratio * c), math.ceil(c / 16), d_state, 4
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            op = b + ("self_attention." if legacy else "op.")
            put.ln(b + ("ln_1" if legacy else "norm"), c)
            put(op + "in_proj.weight", di * (1 if v2 else 2), c)
            put(op + "conv2d.weight", di, 1, 3, 3)
            if not v2:
                put(op + "conv2d.bias", di)
            put(op + "x_proj_weight", K, R + 2 * N, di)
            put(op + "dt_projs_weight", K, di, R)
            put(op + "dt_projs_bias", K, di)
            put(op + "A_logs", K * di, N)
            put(op + "Ds", K * di)
            put.ln(op + "out_norm", di)
            put(op + "out_proj.weight", c, di)
            if local:
                a, r = op + "multi_scan.attn.", int(di * 0.125)
                put.ln(a + "norm", di)
                put.linear(a + "global_reduce", r, di)
                put.linear(a + "channel_select", di, r)
            if v2:
                put.ln(b + "norm2", c)
                if linear2d_as_conv:  # Linear2d also loads weights saved as 1x1 convs
                    put(b + "mlp.fc1.weight", 4 * c, c, 1, 1)
                else:
                    put(b + "mlp.fc1.weight", 4 * c, c)
                put(b + "mlp.fc1.bias", 4 * c)
                put.linear(b + "mlp.fc2", c, 4 * c)
        if i < 3:
            q = f"layers.{i}.downsample."
            if v2:
                put(q + "1.weight", C[i + 1], c, 3, 3); put(q + "1.bias", C[i + 1])
                put.ln(q + "3", C[i + 1])
            else:
                put.ln(q + "norm", 4 * c)
                put(q + "reduction.weight", C[i + 1], 4 * c)
    if outnorms:
        for i, c in enumerate(C):
            put.ln(f"outnorm{i}", c)
    if head:
        pre = "" if legacy else "classifier."
        put.ln(pre + "norm", C[-1])
        put.linear(pre + "head", head, C[-1])
    return put.sd


def _bimamba(put: _Maker, p: str, C: int, d_state: int, suffixes=("", "_b"), expand: int = 2, d_conv: int = 4) -> None:
    """mamba_ssm's Mamba with ``bimamba_type`` v2 (suffixes "", "_b") or v3 ("", "_b", "_s")."""
    E, R, N = expand * C, math.ceil(C / 16), d_state
    put(p + "in_proj.weight", 2 * E, C)
    for s in suffixes:
        put(p + f"conv1d{s}.weight", E, 1, d_conv)
        put(p + f"conv1d{s}.bias", E)
        put(p + f"x_proj{s}.weight", R + 2 * N, E)
        put.linear(p + f"dt_proj{s}", E, R)
        put(p + ("A_log" if not s else f"A{s}_log"), E, N)
        put(p + f"D{s}", E)
    put(p + "out_proj.weight", C, E)


def vim(
    embed_dim=192, depth=24, d_state=16, img_size=224, head=1000, num_registers=0, register_reduce=1,
    cls_token=True, fpn=False, device="cpu", seed=0,
) -> dict[str, torch.Tensor]:
    """hustvl/Vim ``VisionMamba`` (middle class token: ``pos_embed`` covers M + 1 tokens), or with
    ``num_registers`` Mamba(R)'s (registers named ``cls_token`` with ``pos_embed_cls``, a ``neck``
    and ``norm_neck`` when ``register_reduce`` > 1), or with ``cls_token=False, fpn=True`` the
    segmentation backbone ``VisionMambaSeg`` (``fpn1``..``fpn4``, no head)."""
    put = _Maker(device, seed)
    C, M = embed_dim, (img_size // 16) ** 2
    put("patch_embed.proj.weight", C, 3, 16, 16); put("patch_embed.proj.bias", C)
    if num_registers:
        put("cls_token", 1, num_registers, C); put("pos_embed_cls", 1, num_registers, C)
        put("pos_embed", 1, M, C)
    elif cls_token:
        put("cls_token", 1, 1, C); put("pos_embed", 1, M + 1, C)
    else:
        put("pos_embed", 1, M, C)
    for i in range(depth):
        put(f"layers.{i}.norm.weight", C)  # mamba_ssm RMSNorm: weight only
        _bimamba(put, f"layers.{i}.mixer.", C, d_state)
    put("norm_f.weight", C)
    if fpn:
        put("fpn1.0.weight", C, C, 2, 2); put("fpn1.0.bias", C)
        put.ln("fpn1.1", C); put("fpn1.1.running_mean", C); put("fpn1.1.running_var", C)
        put("fpn1.3.weight", C, C, 2, 2); put("fpn1.3.bias", C)
        put("fpn2.0.weight", C, C, 2, 2); put("fpn2.0.bias", C)
    if head:
        feat = C
        if num_registers:
            red = C // register_reduce
            if register_reduce > 1:
                put("neck.weight", red, C)
                put("norm_neck.weight", num_registers * red)
            feat = C * (num_registers // register_reduce)
        put.linear("head", head, feat)
    return put.sd


def segmamba_encoder(in_chans=1, dims=(48, 96, 192, 384), depths=(2, 2, 2, 2), d_state=16, device="cpu", seed=0):
    """SegMamba's ``MambaEncoder`` (stem conv 7^3, [IN, conv 2^3] downsamples, GSC, ToM layers with
    bimamba v3, per-output IN + MlpChannel of 1^3 convs)."""
    put = _Maker(device, seed)
    put("downsample_layers.0.0.weight", dims[0], in_chans, 7, 7, 7); put("downsample_layers.0.0.bias", dims[0])
    for i in range(1, 4):
        put(f"downsample_layers.{i}.1.weight", dims[i], dims[i - 1], 2, 2, 2)
        put(f"downsample_layers.{i}.1.bias", dims[i])
    for i, d in enumerate(dims):
        g = f"gscs.{i}."
        for name, k in (("proj", 3), ("proj2", 3), ("proj3", 1), ("proj4", 1)):
            put(g + name + ".weight", d, d, k, k, k); put(g + name + ".bias", d)
        for j in range(depths[i]):
            put.ln(f"stages.{i}.{j}.norm", d)
            _bimamba(put, f"stages.{i}.{j}.mamba.", d, d_state, suffixes=("", "_b", "_s"))
        put(f"mlps.{i}.fc1.weight", 2 * d, d, 1, 1, 1); put(f"mlps.{i}.fc1.bias", 2 * d)
        put(f"mlps.{i}.fc2.weight", d, 2 * d, 1, 1, 1); put(f"mlps.{i}.fc2.bias", d)
    return put.sd


def numel(sd: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in sd.values())
