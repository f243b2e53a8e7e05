"""Vim / Mamba(R): routes, route-vs-classic equivalence, feature contract, the dense pyramid, timm."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from mamba_dense.encoders import vim as vim_mod
from mamba_dense.encoders.vim import Vim, checkpoint_filter_fn, vim_route
from mamba_dense.kernels import routes, selective_scan
from mamba_dense.layers.seq_mixer import RouteMamba


def _tiny(**kw) -> Vim:
    args = dict(embed_dim=32, depth=4, d_state=4, num_classes=0, img_size=64)
    args.update(kw)
    return Vim(**args)


# ---------------------------------------------------------------------------------------------
# routes


@pytest.mark.parametrize("cls_token,R", [(False, 0), (True, 0), (False, 3), (True, 12)])
@pytest.mark.parametrize("M", [6, 35])
def test_vim_route_layout(M, cls_token, R):
    route = vim_route(M, cls_token, R)
    L = M + int(cls_token) + R
    assert route.shape == (2, L) and route.dtype == torch.long
    routes.check_route(route, L)
    assert sorted(route[0].tolist()) == list(range(L))  # every token, once
    assert torch.equal(route[1], route[0].flip(0))  # backward = forward reversed
    fwd = route[0].tolist()
    patches = [t for t in fwd if t < M]
    assert patches == list(range(M))  # patches in raster order
    if cls_token:
        before_cls = fwd[: fwd.index(M)]
        assert sum(t < M for t in before_cls) == M // 2  # Vim's middle class token
    if R:
        steps = [fwd.index(M + int(cls_token) + r) for r in range(R)]
        # official Mamba(R) (get_cls_idx): groups of S // (R + 1) tokens, each followed by a register
        group = (M + int(cls_token)) // (R + 1)
        assert steps == [(r + 1) * group + r for r in range(R)]
    if not cls_token and not R:
        assert torch.equal(route, routes.bidirectional(M))


# ---------------------------------------------------------------------------------------------
# the route-based mixer equals the classic flip -> conv -> scan -> flip Mamba


def _classic_direction(m: RouteMamba, u: torch.Tensor, seq: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Route k of ``m`` computed the classic way: the tokens are physically put in ``seq`` order
    (as Mamba(R) does with registers), flipped for the backward scan, causal conv1d, SiLU, the
    route's x_proj / dt_proj, and ONE single-route raster scan; then flipped / un-permuted back."""
    B, L, E = u.shape
    s = u[:, seq]
    if flip:
        s = s.flip(1)
    c = F.conv1d(s.transpose(1, 2), m.conv1d_weight[k][:, None], m.conv1d_bias[k], padding=m.d_conv - 1, groups=E)
    c = F.silu(c[..., :L]).transpose(1, 2).contiguous()
    ssm = m.ssm
    R, N = ssm.dt_rank, ssm.d_state
    dt_lr, Bs, Cs = (c @ ssm.x_proj_weight[k].T).split([R, N, N], -1)
    dt = dt_lr @ ssm.dt_projs_weight[k].T
    y = selective_scan(
        c,
        dt[:, :, None].contiguous(),
        -torch.exp(ssm.A_logs[k : k + 1]),
        Bs[:, :, None].contiguous(),
        Cs[:, :, None].contiguous(),
        ssm.Ds[k : k + 1],
        ssm.dt_projs_bias[k : k + 1],
        route=routes.raster(L)[None],
    )
    if flip:
        y = y.flip(1)
    out = torch.empty_like(y)
    out[:, seq] = y
    return out


@pytest.mark.parametrize("cls_token,R", [(False, 0), (True, 0), (False, 4), (True, 3)])
def test_bidirectional_equals_flip_scan_flip(cls_token, R):
    torch.manual_seed(0)
    M, C = 13, 8
    L = M + int(cls_token) + R
    m = RouteMamba(C, num_routes=2, d_state=4, divide_out=True).double()
    with torch.no_grad():  # non-trivial A, D so every term is exercised
        m.ssm.A_logs.add_(0.3 * torch.randn_like(m.ssm.A_logs))
        m.ssm.Ds.add_(0.5 * torch.randn_like(m.ssm.Ds))
    x = torch.randn(2, L, C, dtype=torch.float64)
    route = vim_route(M, cls_token, R)
    u, z = m.in_proj(x).chunk(2, dim=-1)
    per_route = m.scan_routes(u.contiguous(), route)  # (B, 2, L, E)

    seq = route[0]  # the physical Mamba(R)/Vim sequence order
    fwd = _classic_direction(m, u, seq, 0, flip=False)
    bwd = _classic_direction(m, u, seq, 1, flip=True)
    torch.testing.assert_close(per_route[:, 0], fwd, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(per_route[:, 1], bwd, rtol=1e-9, atol=1e-9)

    # and the whole mixer is Vim's v2: out_proj((y_f + y_b) / 2 * SiLU(z))
    expect = m.out_proj((fwd + bwd) / 2 * F.silu(z))
    torch.testing.assert_close(m(x, route), expect, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# encoder contract


@pytest.mark.parametrize("hw", [(32, 48), (33, 50)])
@pytest.mark.parametrize("cls_token,R", [(True, 0), (False, 4), (True, 2)])
def test_forward_backward_and_shapes(hw, cls_token, R):
    torch.manual_seed(0)
    m = _tiny(cls_token=cls_token, num_registers=R, num_classes=5)
    x = torch.randn(2, 3, *hw)
    idx = m.default_out_indices
    final, feats = m.forward_intermediates(x, indices=idx)
    gh, gw = -(-hw[0] // 16), -(-hw[1] // 16)
    assert final.shape == (2, gh * gw + int(cls_token) + R, 32)
    assert len(feats) == len(idx)
    for f, i in zip(feats, idx):
        info = m.feature_info[i]
        assert info["reduction"] == 16 and info["module"] == f"blocks.{i}"
        assert f.shape == (2, info["num_chs"], gh, gw)
    logits = m(x)
    assert logits.shape == (2, 5)
    (logits.sum() + sum(f.square().mean() for f in feats)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if R:
        assert m.reg_token.grad.abs().sum() > 0
    if cls_token:
        assert m.cls_token.grad.abs().sum() > 0


def test_registers_in_routes_and_dropped_from_features():
    torch.manual_seed(0)
    R = 5
    m = _tiny(cls_token=True, num_registers=R).eval()
    x = torch.randn(1, 3, 48, 64)
    M = 3 * 4
    route = m.route_for(M)
    reg_ids = set(range(M + 1, M + 1 + R))
    assert reg_ids <= set(route[0].tolist()) and reg_ids <= set(route[1].tolist())
    final, nlc = m.forward_intermediates(x, indices=[1, 3], output_fmt="NLC")
    nchw = m.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert nlc[0].shape == (1, M, 32)  # only the patch tokens
    torch.testing.assert_close(nchw[1], nlc[1].reshape(1, 3, 4, 32).permute(0, 3, 1, 2))
    normed = m.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True, output_fmt="NLC")[0]
    torch.testing.assert_close(normed, final[:, :M])  # last block + norm == final tokens' patches
    # the registers do take part: changing them changes the patch features
    with torch.no_grad():
        m.reg_token.add_(1.0)
    nlc2 = m.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True)
    assert not torch.allclose(nlc2[0], nlc[1])


def test_stop_early_prune_and_errors():
    m = _tiny()
    x = torch.randn(1, 3, 32, 32)
    a = m.forward_intermediates(x, indices=[1], intermediates_only=True)
    b = m.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(a[0], b[0])
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NCDHW")
    with pytest.raises(ValueError, match="global_pool"):
        _tiny(cls_token=False, global_pool="token")
    kept = m.prune_intermediate_layers([0, 2])
    assert kept == [0, 2] and len(m.blocks) == 3


def test_pos_embed_resampled_to_any_grid():
    m = _tiny(img_size=32)  # stored grid 2 x 2
    assert m.pos_embed.shape == (1, 4, 32)
    feats = m.forward_intermediates(torch.randn(1, 3, 80, 17), indices=1, intermediates_only=True)
    assert feats[0].shape == (1, 32, 5, 2)


# ---------------------------------------------------------------------------------------------
# timm, meta, parameter counts


def test_timm_features_only_is_the_dense_pyramid():
    m = timm.create_model("vim_small", features_only=True)
    assert m.feature_info.channels() == [384] * 4
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    assert m.model.pyramid_blocks == (5, 11, 17, 23)
    feats = m(torch.randn(1, 3, 32, 48))
    assert [tuple(f.shape) for f in feats] == [(1, 384, 8, 12), (1, 384, 4, 6), (1, 384, 2, 3), (1, 384, 1, 2)]

    # the plain stride-16 block features on request
    r = timm.create_model(
        "vim_tiny_reg", features_only=True, simple_pyramid=False, out_indices=(3, 23), num_registers=4, embed_dim=32
    )
    assert r.feature_info.reduction() == [16, 16]
    feats = r(torch.randn(1, 3, 33, 47))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 3, 3)] * 2
    assert len(r.model.blocks) == 24


def test_pyramid_is_vims_simple_fpn_on_the_tapped_blocks():
    torch.manual_seed(0)
    m = _tiny(simple_pyramid=True, cls_token=True, num_registers=3).eval()
    assert m.pyramid_blocks == (0, 1, 2, 3)
    x = torch.randn(2, 3, 40, 72)  # grid 3 x 5 after padding to 48 x 80
    with torch.no_grad():
        feats = m.forward_intermediates(x, intermediates_only=True)
        blocks = m.forward_block_maps(x)
    assert [tuple(f.shape[2:]) for f in feats] == [(10, 18), (5, 9), (3, 5), (2, 3)]
    p = m.pyramid.levels
    with torch.no_grad():  # official fpn1..fpn4: deconv-BN-GELU-deconv, deconv, identity, max-pool
        up4 = p[0][3](F.gelu(p[0][1](p[0][0](blocks[0]))))
        up2 = p[1][0](blocks[1])
        down = F.max_pool2d(blocks[3], 2, ceil_mode=True)
    torch.testing.assert_close(feats[0], up4[..., :10, :18])  # cropped to ceil(H/4) x ceil(W/4)
    torch.testing.assert_close(feats[1], up2[..., :5, :9])
    torch.testing.assert_close(feats[2], blocks[2])
    torch.testing.assert_close(feats[3], down)
    with torch.no_grad():
        regs = m.forward_intermediates(x, indices=[2], intermediates_only=True, return_registers=True)
        tokens = m._run_blocks(x, {2}, False)[0][2]
    (fmap, r), = regs
    torch.testing.assert_close(fmap, feats[2])
    torch.testing.assert_close(r, tokens[:, -3:])  # the 3 registers after block 2, not the cls token
    assert m.prune_intermediate_layers([1]) == [1] and len(m.blocks) == 2


def test_pyramid_blocks_for_any_depth():
    assert vim_mod._even_blocks(24) == (5, 11, 17, 23)
    assert vim_mod._even_blocks(2) == (0, 0, 1, 1)
    assert vim_mod._even_blocks(1) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="4 blocks"):
        _tiny(simple_pyramid=True, pyramid_blocks=(1, 3))
    with pytest.raises(ValueError, match="must index"):
        _tiny(pyramid_blocks=(0, 1, 2, 9))
    with pytest.raises(ValueError, match="output_fmt"):
        _tiny(simple_pyramid=True).forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")


def test_mambar_aliases_registered():
    for n in ("mambar_tiny", "mambar_small", "mambar_base", "vim_small_reg"):
        assert n in timm.list_models("*")
    assert vim_mod.default_cfgs  # pretrained cfgs registered (no download URLs)
    nwd = _tiny().no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.mixer.ssm.A_logs", "blocks.0.mixer.ssm.Ds"} <= nwd


# ---------------------------------------------------------------------------------------------
# official checkpoint layout -> ours (more in test_convert.py)


def test_timm_pretrained_from_file_only(tmp_path):
    import _official as official

    sd = official.vim(embed_dim=192, depth=2, img_size=64)  # official layout at a 4 x 4 grid
    path = tmp_path / "vim_t.pth"
    torch.save({"model": sd}, path)
    overlay = dict(file=str(path))
    m = timm.create_model("vim_tiny", pretrained=True, pretrained_cfg_overlay=overlay, depth=2, img_size=96)
    assert m.pos_embed.shape == (1, 36, 192)  # resampled 4 x 4 -> 6 x 6 by the filter
    torch.testing.assert_close(m.blocks[1].mixer.ssm.Ds[1], sd["layers.1.mixer.D_b"])
    assert checkpoint_filter_fn(m.state_dict(), m).keys() == m.state_dict().keys()  # ours pass through
    with pytest.raises(ValueError, match="never downloaded"):
        timm.create_model("vim_tiny", pretrained=True, depth=1)


def test_in_package_registry():
    import mamba_dense.encoders as enc

    assert {"vim_tiny", "vim_small", "vim_small_reg"} <= set(enc.list_encoders("vim*"))
    assert enc.get_encoder_entry("vim_small_reg").spatial_dims == 2


def test_compiles_as_one_graph_and_matches_eager(monkeypatch):
    """Vim / Mamba(R) trace with fullgraph=True through the registered ops (routes and their
    inverses are cached device tensors looked up by key), with eager's features and gradients."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    torch.manual_seed(0)
    m = _tiny(embed_dim=8, depth=1, d_state=2, img_size=32, cls_token=True, num_registers=2).double().to(dev)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=dev)
    m.forward_features(x)  # eager warm-up at this size: routes cached on the device
    compiled = torch.compile(m.forward_features, backend="aot_eager", fullgraph=True, dynamic=False)
    xa = x.clone().requires_grad_()
    y = compiled(xa)
    g = torch.autograd.grad(y.square().sum(), [xa, m.blocks[0].mixer.conv1d_weight])
    xb = x.clone().requires_grad_()
    y2 = m.forward_features(xb)
    g2 = torch.autograd.grad(y2.square().sum(), [xb, m.blocks[0].mixer.conv1d_weight])
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_wrong_files_and_settings_are_named(tmp_path):
    """A VMamba checkpoint or an empty one given to Vim failed with a bare KeyError ('pos_embed');
    smp's DeepLabV3(+) passes output_stride=16, which Vim did not take at all; timm's
    PretrainedCfg dataclass naming the file was refused as "no file"."""
    import timm
    from timm.models import PretrainedCfg

    import mamba_dense.encoders  # noqa: F401
    from mamba_dense.convert import CheckpointMismatchError, load_encoder_weights

    kw = dict(embed_dim=16, depth=2, d_state=2)
    vmamba = timm.create_model("vmamba_tiny", depths=(1, 1, 1, 1), dims=16)
    torch.save({"model": vmamba.state_dict()}, tmp_path / "vssm.pth")
    torch.save({"model": {}}, tmp_path / "empty.pth")
    vim = timm.create_model("vim_tiny", **kw)
    for f in ("vssm.pth", "empty.pth"):
        with pytest.raises(CheckpointMismatchError, match=rf"{f}: not a Vim checkpoint: it lacks 'pos_embed'.*Fix"):
            load_encoder_weights(vim, tmp_path / f)
    with pytest.raises(ValueError, match=r"Vim supports output_stride=32 only \(got 16\).*Fix"):
        timm.create_model("vim_tiny", features_only=True, output_stride=16, **kw)
    torch.save({"model": vim.state_dict()}, tmp_path / "vim.pth")
    with pytest.raises(CheckpointMismatchError):  # the dataclass's file is read (and checked)
        timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg=PretrainedCfg(file=str(tmp_path / "vim.pth")),
                          depths=(1, 1, 1, 1), dims=16)
