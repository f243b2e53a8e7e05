"""3D encoders: shapes vs feature_info, odd sizes, backward, meta, ToM vs the classic v3 mixer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.encoders.volumetric import (
    VOLUMETRIC_ENCODERS,
    SegMambaEncoder,
    VMamba3dEncoder,
    create_volumetric_encoder,
    segmamba_checkpoint_filter,
)
from mamba_dense.kernels import routes, selective_scan
from mamba_dense.layers.seq_mixer import RouteMamba

SMALL = dict(dims=(8, 16, 16, 24), depths=(1, 1, 1, 1))


def _ceil(n: int, r: int) -> int:
    return -(-n // r)


def _check_feats(model, feats, shape, batch):
    assert len(feats) == len(model.feature_info) == 4
    for f, info in zip(feats, model.feature_info):
        r = info["reduction"]
        assert f.shape == (batch, info["num_chs"], *(_ceil(s, r) for s in shape))
        assert torch.isfinite(f).all()
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16]


@pytest.mark.parametrize("name", sorted(VOLUMETRIC_ENCODERS))
def test_registered_tiny_forward_backward_16cube(name):
    torch.manual_seed(0)
    m = create_volumetric_encoder(name, in_chans=1)
    assert [i["num_chs"] for i in m.feature_info] == [48, 96, 192, 384]
    x = torch.randn(1, 1, 16, 16, 16)
    feats = m(x)
    _check_feats(m, feats, (16, 16, 16), 1)  # stride 16 -> a single voxel, allowed
    sum(f.square().mean() for f in feats).backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cls", [SegMambaEncoder, VMamba3dEncoder])
@pytest.mark.parametrize("shape", [(20, 24, 28), (9, 17, 5)])
def test_odd_sizes_and_in_chans(cls, shape):
    torch.manual_seed(0)
    m = cls(in_chans=4, **SMALL)
    x = torch.randn(2, 4, *shape, requires_grad=True)
    final, feats = m.forward_intermediates(x)
    _check_feats(m, feats, shape, 2)
    assert final.shape[1] == m.dims[-1]
    sum(f.mean() for f in feats).backward()
    assert torch.isfinite(x.grad).all()


def test_indices_formats_and_errors():
    m = VMamba3dEncoder(**SMALL)
    x = torch.randn(1, 1, 8, 10, 12)
    full = m.forward_intermediates(x, intermediates_only=True)
    part = m.forward_intermediates(x, indices=[1, -1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(part[0], full[1])
    last = m.forward_intermediates(x, indices=1, output_fmt="NDHWC", intermediates_only=True)
    torch.testing.assert_close(last[0], full[3].permute(0, 2, 3, 4, 1))
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NCHW")
    with pytest.raises(ValueError, match="volume"):
        m(torch.randn(1, 1, 8, 8))
    # wrong channel count and empty batches: a clear error, not a conv / reshape error from inside
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\), got \(1, 3, 8, 10, 12\); build the encoder with in_chans=3"):
        m(torch.randn(1, 3, 8, 10, 12))
    for empty in ((0, 1, 8, 10, 12), (1, 1, 0, 10, 12)):
        with pytest.raises(ValueError, match="at least one volume of at least 1 x 1 x 1 voxels"):
            m(torch.randn(*empty))
    with pytest.raises(ValueError, match="feature indices"):
        m.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="available"):
        create_volumetric_encoder("segmamba_huge")


@pytest.mark.parametrize("name", sorted(VOLUMETRIC_ENCODERS))
def test_meta_construction(name):
    with torch.device("meta"):
        m = create_volumetric_encoder(name, in_chans=4)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m.stem.weight.shape[1] == 4 if name == "segmamba_tiny" else m.stem.conv1.weight.shape[1] == 4


# ---------------------------------------------------------------------------------------------
# ToM (one scan call, K = 3 routes) equals SegMamba's v3 mixer computed direction by direction


def test_segmamba_route_is_official_inter_slice_order():
    d, h, w = 4, 3, 5
    L = d * h * w
    # release: xz.chunk(nslices = d, dim=-1) -> stack(dim=-1) -> flatten: position i*d + j holds token j*(h*w) + i
    official = torch.stack(torch.arange(L).chunk(d), dim=-1).flatten()
    r = routes.segmamba3d(d, h, w)
    assert torch.equal(r[2], official)
    assert torch.equal(r[0], torch.arange(L)) and torch.equal(r[1], torch.arange(L).flip(0))


def _classic(m: RouteMamba, u: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Route k the release's way: reorder the tokens, causal conv1d, SiLU, project, one raster scan, undo."""
    B, L, E = u.shape
    s = u[:, order]
    c = F.conv1d(s.transpose(1, 2), m.conv1d_weight[k][:, None], m.conv1d_bias[k], padding=m.d_conv - 1, groups=E)
    c = F.silu(c[..., :L]).transpose(1, 2).contiguous()
    ssm = m.ssm
    R, N = ssm.dt_rank, ssm.d_state
    dt_lr, Bs, Cs = (c @ ssm.x_proj_weight[k].T).split([R, N, N], -1)
    y = selective_scan(
        c,
        (dt_lr @ ssm.dt_projs_weight[k].T)[:, :, None].contiguous(),
        -torch.exp(ssm.A_logs[k : k + 1]),
        Bs[:, :, None].contiguous(),
        Cs[:, :, None].contiguous(),
        ssm.Ds[k : k + 1],
        ssm.dt_projs_bias[k : k + 1],
        route=routes.raster(L)[None],
    )
    out = torch.empty_like(y)
    out[:, order] = y
    return out


def test_tom_equals_three_classic_scans():
    torch.manual_seed(0)
    d, h, w, C = 3, 4, 5, 8
    L = d * h * w
    m = RouteMamba(C, num_routes=3, d_state=4).double()
    with torch.no_grad():
        m.ssm.A_logs.add_(0.3 * torch.randn_like(m.ssm.A_logs))
        m.ssm.Ds.add_(0.5 * torch.randn_like(m.ssm.Ds))
    x = torch.randn(2, L, C, dtype=torch.float64)
    u, z = m.in_proj(x).chunk(2, dim=-1)
    fwd = torch.arange(L)
    inter = torch.stack(fwd.chunk(d), dim=-1).flatten()
    expect = sum(_classic(m, u, order, k) for k, order in enumerate([fwd, fwd.flip(0), inter]))
    got = m(x, routes.segmamba3d(d, h, w))
    torch.testing.assert_close(got, m.out_proj(expect * F.silu(z)), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# official SegMamba keys -> ours


def test_segmamba_checkpoint_filter_loads_official_layout():
    m = SegMambaEncoder(in_chans=1, dims=(8, 16, 16, 16), depths=(1, 2, 1, 1), d_state=2)
    g = torch.Generator().manual_seed(0)
    ours = m.state_dict()
    official = {"decoder5.transp_conv.conv.weight": torch.zeros(1)}  # decoder keys are ignored
    for k, v in ours.items():  # build the release's names (whole model: "vit." prefix)
        rnd = torch.randn(v.shape, generator=g)
        if k.startswith("stem."):
            official["vit.downsample_layers.0.0." + k[5:]] = rnd
        elif k.startswith("downsamples."):
            _, i, _, rest = k.split(".", 3)
            official[f"vit.downsample_layers.{int(i) + 1}.1.{rest}"] = rnd
        elif ".mamba." in k and not k.endswith(("in_proj.weight", "out_proj.weight")):
            head, rest = k.split(".mamba.")
            names = {
                "conv1d_weight": [f"conv1d{s}.weight" for s in ("", "_b", "_s")],
                "conv1d_bias": [f"conv1d{s}.bias" for s in ("", "_b", "_s")],
                "ssm.x_proj_weight": [f"x_proj{s}.weight" for s in ("", "_b", "_s")],
                "ssm.dt_projs_weight": [f"dt_proj{s}.weight" for s in ("", "_b", "_s")],
                "ssm.dt_projs_bias": [f"dt_proj{s}.bias" for s in ("", "_b", "_s")],
                "ssm.A_logs": ["A_log", "A_b_log", "A_s_log"],
                "ssm.Ds": ["D", "D_b", "D_s"],
            }[rest]
            for j, n in enumerate(names):
                t = rnd[j]
                official[f"vit.{head}.mamba.{n}"] = t[:, None] if n.startswith("conv1d") and n.endswith("weight") else t
        else:
            official["vit." + k] = rnd
    converted = segmamba_checkpoint_filter({"state_dict": official})
    m.load_state_dict(converted, strict=True)
    torch.testing.assert_close(
        m.stages[1][1].mamba.ssm.A_logs[2], official["vit.stages.1.1.mamba.A_s_log"]
    )
    torch.testing.assert_close(m.stem.weight, official["vit.downsample_layers.0.0.weight"])


def test_in_package_registry():
    import mamba_dense.encoders as enc

    assert set(VOLUMETRIC_ENCODERS) <= set(enc.list_encoders(spatial_dims=3))
    with torch.device("meta"):
        m = enc.create_encoder("segmamba_tiny", in_chans=4)
    assert isinstance(m, SegMambaEncoder) and m.in_chans == 4
    with pytest.raises(ValueError, match="never downloaded"):
        create_volumetric_encoder("vmamba3d_tiny", pretrained=True)


def test_segmamba_channels_last_maps_give_the_same_features_and_gradients():
    torch.manual_seed(0)
    kw = dict(in_chans=2, dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), d_state=2)
    ref, cl = SegMambaEncoder(**kw), SegMambaEncoder(**kw, channels_last=True)
    cl.load_state_dict(ref.state_dict())
    x = torch.randn(1, 2, 9, 12, 16) * 2 + 1
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    fr, fc = ref(xr), cl(xc)
    assert [f.shape for f in fr] == [f.shape for f in fc]
    for a, b in zip(fr, fc):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    sum(f.square().sum() for f in fr).backward()
    sum(f.square().sum() for f in fc).backward()
    assert torch.allclose(xr.grad, xc.grad, rtol=1e-4, atol=1e-5)


def test_segmamba_with_unet3d_decoder_compiles_as_one_graph(monkeypatch):
    """The whole SegMamba encoder + UNet3D decoder traces with fullgraph=True through the registered
    Triton ops (Triton interpreter): the fused norms, route convs and scans are opaque ops and the
    routes cached device tensors, so mode="reduce-overhead" can capture one CUDA graph per pass.
    Outputs and gradients equal eager's."""
    from mamba_dense.heads.unet3d import UNet3DDecoder

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    torch.manual_seed(0)
    enc = SegMambaEncoder(in_chans=1, dims=(4, 8, 8, 8), depths=(1, 1, 1, 1), d_state=2)
    dec = UNet3DDecoder(enc.dims, num_classes=2, in_channels=1, decoder_channels=(4, 4, 8, 8))
    model = torch.nn.ModuleDict(dict(enc=enc, dec=dec)).to(dev)

    def run(x):
        return model["dec"](x, model["enc"](x))

    # NOTE: depth 8 > the stem's 7: with depth <= 7, PyTorch 2.14's oneDNN Conv3d weight gradient on the CPU
    # returns garbage under OMP_NUM_THREADS=1 (eager too; a plain nn.Conv3d(1, 4, 7, 2, 3) shows it)
    x = torch.randn(1, 1, 8, 4, 5, device=dev)
    run(x)  # eager warm-up at this size: the routes become cached device tensors
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True, dynamic=False)
    params = [enc.stem.weight, enc.stages[0][0].mamba.conv1d_weight, dec.stem.norm1.weight]
    xa = x.clone().requires_grad_()
    y = compiled(xa)
    g = torch.autograd.grad(y.square().sum(), [xa, *params])
    xb = x.clone().requires_grad_()
    y2 = run(xb)
    g2 = torch.autograd.grad(y2.square().sum(), [xb, *params])
    assert y.shape == (1, 2, 8, 4, 5) and torch.isfinite(y).all()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unet3d_decoder_refuses_maps_of_another_volume():
    """Maps of a 16^3 volume with an 8^3 image were cropped to fit and gave an 8^3 output, silently."""
    from mamba_dense.heads.unet3d import UNet3DDecoder

    torch.manual_seed(0)
    enc = SegMambaEncoder(in_chans=1, dims=(4, 8, 8, 8), depths=(1, 1, 1, 1), d_state=2)
    dec = UNet3DDecoder(enc.dims, num_classes=2, in_channels=1, decoder_channels=(4, 4, 8, 8))
    big, small = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        feats = enc(big)
        assert dec(big, feats).shape == (1, 2, 16, 16, 16)
        with pytest.raises(ValueError, match=r"do not belong to the image \(1, 1, 8, 8, 8\)"):
            dec(small, feats)
        with pytest.raises(ValueError, match=r"image must be \(B, C, D, H, W\)"):
            dec(big[0], feats)
