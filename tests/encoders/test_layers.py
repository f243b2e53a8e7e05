"""mamba_dense.layers: SSMCore init and projections, SS2D's cross scan against the released
copy-based computation on H != W, autocast, stems/downsamplers on odd sizes.

(Kept under tests/encoders/ with the encoders that are their only users so far.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.kernels import routes, selective_scan
from mamba_dense.layers import SS2D, ConvDownsample, ConvStem, PatchEmbed, PatchMerging, SSMCore, VSSBlock


def test_ssmcore_init_matches_mamba():
    torch.manual_seed(0)
    core = SSMCore(d_inner=64, num_routes=4, d_state=5, dt_rank="auto", d_model=40)
    assert core.dt_rank == math.ceil(40 / 16) == 3
    assert core.x_proj_weight.shape == (4, 3 + 10, 64) and core.dt_projs_weight.shape == (4, 64, 3)
    torch.testing.assert_close(core.A_logs, torch.log(torch.arange(1.0, 6.0)).expand(4, 64, 5))
    assert torch.equal(core.Ds, torch.ones(4, 64))
    dt = F.softplus(core.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert core.dt_projs_weight.abs().max() <= 3**-0.5
    assert core.x_proj_weight.abs().max() <= 64**-0.5


def _explicit_cross_scan(core: SSMCore, u: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """VMamba's released computation: 4 copies (row, column, both flipped), per-route
    projections, one scan each, then the copies are un-permuted and summed (CrossMerge)."""
    row = torch.arange(h * w)
    col = torch.arange(h * w).view(h, w).t().reshape(-1)
    orders = [row, col, row.flip(0), col.flip(0)]
    out = torch.zeros_like(u)
    for k, order in enumerate(orders):
        seq = u[:, order].contiguous()
        x_dbl = torch.einsum("bld,cd->blc", seq, core.x_proj_weight[k])
        dt_r, B, C = x_dbl.split([core.dt_rank, core.d_state, core.d_state], dim=-1)
        dt = torch.einsum("blr,dr->bld", dt_r, core.dt_projs_weight[k])
        y = selective_scan(
            seq, dt[:, :, None].contiguous(), -torch.exp(core.A_logs[k : k + 1]), B[:, :, None].contiguous(),
            C[:, :, None].contiguous(), core.Ds[k : k + 1], core.dt_projs_bias[k : k + 1],
            route=routes.raster(h * w)[None],
        )
        out[:, order] += y
    return out


@pytest.mark.parametrize("hw", [(3, 7), (6, 2)])
def test_ss2d_cross_scan_matches_copy_based_release(hw):
    h, w = hw
    torch.manual_seed(0)
    m = SS2D(12, d_state=3, ssm_ratio=1.5).double()
    u = torch.randn(2, h * w, m.d_inner, dtype=torch.float64)
    got = m.ssm(u, routes.cross2d(h, w))
    torch.testing.assert_close(got, _explicit_cross_scan(m.ssm, u, h, w), rtol=1e-7, atol=1e-7)


def test_ss2d_forward_composition_and_gate():
    torch.manual_seed(0)
    for gate in (False, True):
        m = SS2D(8, d_state=2, ssm_ratio=2.0, gate=gate, conv_bias=gate).double()
        x = torch.randn(1, 4, 5, 8, dtype=torch.float64)
        xz = m.in_proj(x)
        u, z = (xz.chunk(2, -1) if gate else (xz, None))
        u = F.silu(m.conv2d(u.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        y = m.out_norm(m.ssm(u.reshape(1, 20, -1), routes.cross2d(4, 5)).view(1, 4, 5, -1))
        if gate:
            y = y * F.silu(z)
        torch.testing.assert_close(m(x), m.out_proj(y))
        assert m.in_proj.weight.shape == (16 * (2 if gate else 1), 8) and m.in_proj.bias is None
        assert (m.conv2d.bias is not None) == gate and m.out_proj.bias is None


def test_block_under_autocast_bf16():
    torch.manual_seed(0)
    blk = VSSBlock(16, SS2D(16, d_state=2))
    x = torch.randn(2, 5, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(x)
    assert torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), blk(x), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("hw", [(63, 45), (1, 1), (8, 9)])
def test_stems_and_downsamplers_ceil_any_size(hw):
    h, w = hw
    x = torch.randn(1, 3, h, w)
    ceil4 = (-(-h // 4), -(-w // 4))
    assert ConvStem(3, 8)(x).shape == (1, *ceil4, 8)
    assert PatchEmbed(3, 8)(x).shape == (1, *ceil4, 8)
    t = torch.randn(1, h, w, 8)
    assert ConvDownsample(8, 16)(t).shape == (1, -(-h // 2), -(-w // 2), 16)
    assert PatchMerging(8, 16)(t).shape == (1, -(-h // 2), -(-w // 2), 16)


def test_patch_merging_order_is_swin_vmamba():
    pm = PatchMerging(1, 4)
    with torch.no_grad():
        pm.norm.weight.fill_(1), pm.norm.bias.zero_(), pm.reduction.weight.copy_(torch.eye(4))
    x = torch.tensor([[0.0, 2.0], [1.0, 3.0]]).view(1, 2, 2, 1)  # (0,0)=0, (1,0)=1, (0,1)=2, (1,1)=3
    y = pm(x).view(-1)
    assert torch.all(y[1:] > y[:-1])  # concatenated as (0,0), (1,0), (0,1), (1,1)


def test_lowrank_dt_equals_per_route_dt_projection():
    """The block-diagonal product equals dt[..., k, :] = dt_proj_k(x_dbl[..., k, :R]), values and gradients."""
    from mamba_dense.layers.ssm import lowrank_dt

    K, D, R, N = 4, 12, 3, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, K * (R + 2 * N), generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, D, R, generator=g, dtype=torch.float64, requires_grad=True)
    out = lowrank_dt(x, w, N)
    ref = torch.einsum("blkr,kdr->blkd", x.view(2, 5, K, R + 2 * N)[..., :R], w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(out)
    g1 = torch.autograd.grad(out, [x, w], gy)
    g2 = torch.autograd.grad(ref, [x, w], gy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_per_route_linear_equals_batched_einsum():
    from mamba_dense.layers.ssm import per_route_linear

    K, C, E = 3, 7, 5
    g = torch.Generator().manual_seed(0)
    xk = torch.randn(2, 4, K, E, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, C, E, generator=g, dtype=torch.float64, requires_grad=True)
    out = per_route_linear(xk, w)
    ref = torch.einsum("blke,kce->blkc", xk, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [xk, w], gy), torch.autograd.grad(ref, [xk, w], gy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
