"""Official VMamba / LocalMamba checkpoints -> our modules, on synthetic state dicts that use the
official key names and shapes (MzeroMiko/VMamba ``vmamba.py`` VSSM / Backbone_VSSM,
hunto/LocalMamba ``local_vmamba.py``), written out here by hand from those layouts."""

from __future__ import annotations

import math

import timm
import torch

import mamba_dense.encoders as enc
from mamba_dense.encoders.localmamba import LOCALVMAMBA_TINY_DIRECTIONS
from mamba_dense.encoders.vmamba import checkpoint_filter_fn

DEPTHS, C0 = (1, 1, 2, 1), 16


def _official_vssm(v2: bool, d_state: int, ratio: float, local: bool = False, head: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}

    def put(k, *shape):
        sd[k] = torch.randn(*shape, generator=g)

    dims = [C0 * 2**i for i in range(4)]
    if v2:
        put("patch_embed.0.weight", C0 // 2, 3, 3, 3); put("patch_embed.0.bias", C0 // 2)
        put("patch_embed.2.weight", C0 // 2); put("patch_embed.2.bias", C0 // 2)
        put("patch_embed.5.weight", C0, C0 // 2, 3, 3); put("patch_embed.5.bias", C0)
        put("patch_embed.7.weight", C0); put("patch_embed.7.bias", C0)
    else:
        put("patch_embed.0.weight", C0, 3, 4, 4); put("patch_embed.0.bias", C0)
        put("patch_embed.2.weight", C0); put("patch_embed.2.bias", C0)
    for i, (depth, c) in enumerate(zip(DEPTHS, dims)):
        di, r, n = int(ratio * c), math.ceil(c / 16), d_state
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            put(p + "norm.weight", c); put(p + "norm.bias", c)
            put(p + "op.in_proj.weight", di * (1 if v2 else 2), c)
            put(p + "op.conv2d.weight", di, 1, 3, 3)
            if not v2:
                put(p + "op.conv2d.bias", di)
            put(p + "op.x_proj_weight", 4, r + 2 * n, di)
            put(p + "op.dt_projs_weight", 4, di, r); put(p + "op.dt_projs_bias", 4, di)
            put(p + "op.A_logs", 4 * di, n); put(p + "op.Ds", 4 * di)
            put(p + "op.out_norm.weight", di); put(p + "op.out_norm.bias", di)
            put(p + "op.out_proj.weight", c, di)
            if local:
                a = p + "op.multi_scan.attn."
                put(a + "norm.weight", di); put(a + "norm.bias", di)
                put(a + "global_reduce.weight", di // 8, di); put(a + "global_reduce.bias", di // 8)
                put(a + "channel_select.weight", di, di // 8); put(a + "channel_select.bias", di)
            if v2:
                put(p + "norm2.weight", c); put(p + "norm2.bias", c)
                put(p + "mlp.fc1.weight", 4 * c, c, 1, 1)  # Linear2d weights saved as 1x1 convs
                put(p + "mlp.fc1.bias", 4 * c); put(p + "mlp.fc2.weight", c, 4 * c); put(p + "mlp.fc2.bias", c)
        if i < 3:
            q = f"layers.{i}.downsample."
            if v2:
                put(q + "1.weight", dims[i + 1], c, 3, 3); put(q + "1.bias", dims[i + 1])
                put(q + "3.weight", dims[i + 1]); put(q + "3.bias", dims[i + 1])
            else:
                put(q + "norm.weight", 4 * c); put(q + "norm.bias", 4 * c)
                put(q + "reduction.weight", dims[i + 1], 4 * c)
    if head:
        put("classifier.norm.weight", dims[-1]); put("classifier.norm.bias", dims[-1])
        put("classifier.head.weight", 1000, dims[-1]); put("classifier.head.bias", 1000)
    return sd


def _check_loaded(m, sd, v2=True, local=False):
    ours = m.state_dict()
    blk = m.stages[2].blocks[1].op
    di = blk.d_inner
    torch.testing.assert_close(blk.ssm.A_logs, sd["layers.2.blocks.1.op.A_logs"].view(4, di, -1))
    torch.testing.assert_close(blk.ssm.Ds, sd["layers.2.blocks.1.op.Ds"].view(4, di))
    torch.testing.assert_close(blk.ssm.x_proj_weight, sd["layers.2.blocks.1.op.x_proj_weight"])
    torch.testing.assert_close(m.stages[3].downsample.state_dict()["conv.weight" if v2 else "reduction.weight"],
                               sd["layers.2.downsample." + ("1.weight" if v2 else "reduction.weight")])
    if v2:
        torch.testing.assert_close(m.stem.conv2.weight, sd["patch_embed.5.weight"])
        torch.testing.assert_close(m.stem.norm1.weight, sd["patch_embed.2.weight"])
        torch.testing.assert_close(ours["stages.0.blocks.0.mlp.fc1.weight"], sd["layers.0.blocks.0.mlp.fc1.weight"].flatten(1))
    else:
        torch.testing.assert_close(m.stem.proj.weight, sd["patch_embed.0.weight"])
    if local:
        torch.testing.assert_close(blk.attn.channel_select.weight, sd["layers.2.blocks.1.op.multi_scan.attn.channel_select.weight"])


def test_vmamba_v2_official_keys_load_strict():
    sd = _official_vssm(v2=True, d_state=1, ratio=1.0)
    m = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0)
    m.load_state_dict(checkpoint_filter_fn({"model": sd}, m), strict=True)
    _check_loaded(m, sd)
    torch.testing.assert_close(m.head.weight, sd["classifier.head.weight"])
    torch.testing.assert_close(m.norm.bias, sd["classifier.norm.bias"])


def test_vmamba_v0_and_localmamba_official_keys_load_strict():
    sd = _official_vssm(v2=False, d_state=16, ratio=2.0)
    m = enc.create_encoder("vmamba_tiny_v0", depths=DEPTHS, dims=C0)
    m.load_state_dict(checkpoint_filter_fn(sd, m), strict=True)
    _check_loaded(m, sd, v2=False)
    sd = _official_vssm(v2=False, d_state=16, ratio=2.0, local=True)
    m = enc.create_encoder("localvmamba_tiny", depths=DEPTHS, dims=C0, directions=LOCALVMAMBA_TINY_DIRECTIONS[:5])
    m.load_state_dict(checkpoint_filter_fn({"state_dict": sd}, m), strict=True)
    _check_loaded(m, sd, v2=False, local=True)


def test_dense_backbone_checkpoint_with_outnorms_and_prefix():
    sd = _official_vssm(v2=True, d_state=1, ratio=1.0, head=False)
    for i, c in enumerate(C0 * 2**i for i in range(4)):
        sd[f"outnorm{i}.weight"], sd[f"outnorm{i}.bias"] = torch.rand(c), torch.rand(c)
    sd = {"backbone." + k: v for k, v in sd.items()}
    m = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0, num_classes=0, feature_norms=True)
    missing, unexpected = m.load_state_dict(checkpoint_filter_fn({"state_dict": sd}, m), strict=False)
    assert set(missing) == {"norm.weight", "norm.bias"} and not unexpected
    torch.testing.assert_close(m.feature_norms[3].weight, sd["backbone.outnorm3.weight"])


def test_timm_loads_official_file(tmp_path):
    sd = _official_vssm(v2=True, d_state=1, ratio=1.0)
    path = tmp_path / "vssm_official.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    kw = dict(depths=DEPTHS, dims=C0, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    m = timm.create_model("vmamba_tiny", **kw)
    _check_loaded(m, sd)
    f = timm.create_model("vmamba_tiny", features_only=True, **kw)
    _check_loaded(f.model, sd)
    from mamba_dense.integrations.timm import create_timm_model

    g = create_timm_model("vmamba_tiny", str(path), depths=DEPTHS, dims=C0)
    torch.testing.assert_close(g.head.bias, sd["classifier.head.bias"])
    assert checkpoint_filter_fn(m.state_dict(), m).keys() == m.state_dict().keys()  # ours pass through
