"""Each family's token mixer against a slow reference written here: the tokens are put in each
route's visiting order by hand (orders written from the papers / official code, not taken from
``kernels.routes``), every route is scanned by a plain Python loop over its steps in float64, and
the results are put back on the tokens and merged as the official code does.

Families: VMamba SS2D (v2 and gated v0, with registers), LocalMamba (windowed, padded routes and
per-route channel attention), Hi-Mamba (local + region + gate), Vim / Mamba(R) (per-route causal
conv, middle class token, registers, averaged), SegMamba ToM (3 routes), VMamba-3D SS3D (6 routes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.encoders.himamba import HierarchicalSS2D
from mamba_dense.encoders.localmamba import LocalSS2D
from mamba_dense.encoders.vim import vim_route
from mamba_dense.encoders.volumetric import SS3D
from mamba_dense.layers import SS2D
from mamba_dense.layers.seq_mixer import RouteMamba

B = 2


def loop_scan(ssm, k: int, seq: torch.Tensor) -> torch.Tensor:
    """Route k of an SSMCore over ``seq`` (B, S, E) given in visiting order (zero rows = padding)."""
    R, N = ssm.dt_rank, ssm.d_state
    dt_lr, Bm, Cm = (seq @ ssm.x_proj_weight[k].T).split([R, N, N], dim=-1)
    dt = dt_lr @ ssm.dt_projs_weight[k].T
    A = -torch.exp(ssm.A_logs[k])  # (E, N)
    h = seq.new_zeros(seq.shape[0], seq.shape[2], N)
    ys = []
    for s in range(seq.shape[1]):
        delta = F.softplus(dt[:, s] + ssm.dt_projs_bias[k])  # (B, E)
        h = torch.exp(delta[..., None] * A) * h + (delta * seq[:, s])[..., None] * Bm[:, s, None, :]
        ys.append((h * Cm[:, s, None, :]).sum(-1) + ssm.Ds[k] * seq[:, s])
    return torch.stack(ys, 1)


def gather(tokens: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Tokens in visiting order; -1 gives a zero token (LocalMamba's padding)."""
    zero = tokens.new_zeros(tokens.shape[0], tokens.shape[2])
    return torch.stack([tokens[:, t] if t >= 0 else zero for t in order], 1)


def scatter(y_seq: torch.Tensor, order: list[int], L: int) -> torch.Tensor:
    out = y_seq.new_zeros(y_seq.shape[0], L, y_seq.shape[2])
    for s, t in enumerate(order):
        if t >= 0:
            out[:, t] = y_seq[:, s]
    return out


def splice(order: list[int], first: int, R: int, official: bool = False) -> list[int]:
    """Registers spliced into a sequence: register r before step round((r + 1) * S / (R + 1)) (evenly
    spaced), or, ``official``, after each group of S // (R + 1) tokens (Mamba(R)'s get_cls_idx)."""
    S = len(order)
    out, prev = [], 0
    for r in range(R):
        p = (r + 1) * (S // (R + 1)) if official else round((r + 1) * S / (R + 1))
        out += order[prev:p] + [first + r]
        prev = p
    return out + order[prev:]


def rows(h, w):
    return [i * w + j for i in range(h) for j in range(w)]


def cols(h, w):
    return [i * w + j for j in range(w) for i in range(h)]


def windows(h, w, k):
    hp, wp = -(-h // k) * k, -(-w // k) * k
    return [
        (gi * k + a) * w + gj * k + b if gi * k + a < h and gj * k + b < w else -1
        for gi in range(hp // k) for gj in range(wp // k) for a in range(k) for b in range(k)
    ]


def _perturb(m):
    with torch.no_grad():  # move A, D, dt away from their structured init so every term matters
        for ssm in [mod for mod in m.modules() if hasattr(mod, "A_logs")]:
            ssm.A_logs.add_(0.3 * torch.randn_like(ssm.A_logs))
            ssm.Ds.add_(0.5 * torch.randn_like(ssm.Ds))
            ssm.dt_projs_bias.add_(torch.randn_like(ssm.dt_projs_bias))
    return m


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate, R", [(False, 0), (True, 0), (False, 3)])
def test_ss2d_cross_scan(gate, R):
    torch.manual_seed(0)
    h, w, C = 3, 5, 8
    m = _perturb(SS2D(C, d_state=2, ssm_ratio=1.5, gate=gate, conv_bias=gate).double())
    x = torch.randn(B, h, w, C, dtype=torch.float64)
    regs = torch.randn(B, R, C, dtype=torch.float64)
    L = h * w
    xz = torch.cat([x.reshape(B, L, C), regs], 1) @ m.in_proj.weight.T
    u, z = xz.chunk(2, -1) if gate else (xz, None)
    u_map = F.conv2d(u[:, :L].reshape(B, h, w, -1).permute(0, 3, 1, 2), m.conv2d.weight, m.conv2d.bias,
                     padding=1, groups=m.d_inner)
    tok = F.silu(torch.cat([u_map.flatten(2).transpose(1, 2), u[:, L:]], 1))  # registers skip the conv
    y = 0
    for k, order in enumerate([rows(h, w), cols(h, w), rows(h, w)[::-1], cols(h, w)[::-1]]):
        order = splice(order, L, R)
        y = y + scatter(loop_scan(m.ssm, k, gather(tok, order)), order, L + R)
    y = F.layer_norm(y, (m.d_inner,), m.out_norm.weight, m.out_norm.bias)
    if gate:
        y = y * F.silu(z)
    expect = y @ m.out_proj.weight.T
    if R:
        got_map, got_regs = m.forward_with_registers(x, regs)
        torch.testing.assert_close(got_regs, expect[:, L:], rtol=1e-9, atol=1e-10)
    else:
        got_map = m(x)
    torch.testing.assert_close(got_map, expect[:, :L].reshape(B, h, w, C), rtol=1e-9, atol=1e-10)


def test_localmamba_windows_padding_and_channel_attention():
    torch.manual_seed(0)
    h, w, C = 5, 3, 8
    dirs = ("h_flip", "v", "w2", "w7_flip")
    m = _perturb(LocalSS2D(C, dirs, d_state=2, ssm_ratio=2.0, gate=True, conv_bias=True).double())
    x = torch.randn(B, h, w, C, dtype=torch.float64)
    u, z = (x @ m.in_proj.weight.T).chunk(2, -1)
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), m.conv2d.weight, m.conv2d.bias, padding=1, groups=m.d_inner))
    tok = u.flatten(2).transpose(1, 2)
    orders = {"h": rows(h, w), "v": cols(h, w), "w2": windows(h, w, 2), "w7": windows(h, w, 7)}
    a = m.attn
    y = 0
    for k, d in enumerate(dirs):
        order = orders[d.removesuffix("_flip")]
        order = order[::-1] if d.endswith("_flip") else order
        yk = scatter(loop_scan(m.ssm, k, gather(tok, order)), order, h * w)  # padding outputs dropped
        g = F.layer_norm(yk, (m.d_inner,), a.norm.weight, a.norm.bias).mean(1, keepdim=True)  # SCAttn
        g = torch.sigmoid(F.linear(F.gelu(F.linear(g, a.global_reduce.weight, a.global_reduce.bias)),
                                   a.channel_select.weight, a.channel_select.bias))
        y = y + yk * g
    y = F.layer_norm(y, (m.d_inner,), m.out_norm.weight, m.out_norm.bias) * F.silu(z.reshape(B, h * w, -1))
    expect = (y @ m.out_proj.weight.T).reshape(B, h, w, C)
    torch.testing.assert_close(m(x), expect, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("direction", ["row", "column_flip"])
def test_himamba_local_region_gate(direction):
    torch.manual_seed(0)
    h, w, C, n = 6, 5, 8, 4
    m = _perturb(HierarchicalSS2D(C, direction, region_grid=n, d_state=2).double())
    with torch.no_grad():
        m.gate_weight.normal_(), m.gate_bias.normal_()
    x = torch.randn(B, h, w, C, dtype=torch.float64)
    u = F.silu(F.conv2d((x @ m.in_proj.weight.T).permute(0, 3, 1, 2), m.conv2d.weight, None, padding=1,
                        groups=m.d_inner))  # (B, D, h, w)
    base = {"row": rows, "column": cols}[direction.removesuffix("_flip")]
    flip = direction.endswith("_flip")
    order = base(h, w)[::-1] if flip else base(h, w)
    tok = u.flatten(2).transpose(1, 2)
    local = scatter(loop_scan(m.local_ssm, 0, gather(tok, order)), order, h * w)
    pooled = F.adaptive_avg_pool2d(u, n).flatten(2).transpose(1, 2)
    rorder = base(n, n)[::-1] if flip else base(n, n)
    region = scatter(loop_scan(m.region_ssm, 0, gather(pooled, rorder)), rorder, n * n)
    region = F.interpolate(region.transpose(1, 2).reshape(B, -1, n, n), size=(h, w), mode="nearest")
    region = region.flatten(2).transpose(1, 2)
    g = torch.sigmoid(tok * m.gate_weight + m.gate_bias)
    y = F.layer_norm((1 - g) * local + g * region, (m.d_inner,), m.out_norm.weight, m.out_norm.bias)
    torch.testing.assert_close(m(x), (y @ m.out_proj.weight.T).reshape(B, h, w, C), rtol=1e-9, atol=1e-10)


def _route_mamba_reference(m: RouteMamba, x: torch.Tensor, orders: list[list[int]], divide: bool) -> torch.Tensor:
    """Mamba-1 per route: causal depthwise conv along the route's order, SiLU, the route's SSM."""
    L = x.shape[1]
    u, z = (x @ m.in_proj.weight.T).chunk(2, -1)
    y = 0
    for k, order in enumerate(orders):
        seq = gather(u, order).transpose(1, 2)  # (B, E, S)
        seq = F.conv1d(seq, m.conv1d_weight[k][:, None], m.conv1d_bias[k], padding=m.d_conv - 1, groups=m.d_inner)
        seq = F.silu(seq[..., : len(order)]).transpose(1, 2)
        y = y + scatter(loop_scan(m.ssm, k, seq), order, L)
    if divide:
        y = y / len(orders)
    return (y * F.silu(z)) @ m.out_proj.weight.T


@pytest.mark.parametrize("cls_token, R", [(True, 0), (False, 4), (True, 3)])
def test_vim_and_mambar_bidirectional_mixer(cls_token, R):
    torch.manual_seed(0)
    M, C = 11, 8
    m = _perturb(RouteMamba(C, num_routes=2, d_state=3, divide_out=True).double())
    L = M + int(cls_token) + R
    x = torch.randn(B, L, C, dtype=torch.float64)
    fwd = list(range(M))
    if cls_token:  # Vim: the class token (token M) in the middle of the sequence
        fwd = fwd[: M // 2] + [M] + fwd[M // 2 :]
    fwd = splice(fwd, M + int(cls_token), R, official=True)  # Mamba(R): a register after each group
    expect = _route_mamba_reference(m, x, [fwd, fwd[::-1]], divide=True)
    torch.testing.assert_close(m(x, vim_route(M, cls_token, R)), expect, rtol=1e-9, atol=1e-10)


def test_segmamba_tom_three_routes():
    torch.manual_seed(0)
    d, h, w, C = 3, 2, 4, 8
    m = _perturb(RouteMamba(C, num_routes=3, d_state=3, divide_out=False).double())
    from mamba_dense.encoders.volumetric import _segmamba_route

    L = d * h * w
    x = torch.randn(B, L, C, dtype=torch.float64)
    raster = list(range(L))
    inter_slice = [s * h * w + i for i in range(h * w) for s in range(d)]  # depth fastest
    expect = _route_mamba_reference(m, x, [raster, raster[::-1], inter_slice], divide=False)
    torch.testing.assert_close(m(x, _segmamba_route(d, h, w)), expect, rtol=1e-9, atol=1e-10)


def test_ss3d_six_axis_orders():
    torch.manual_seed(0)
    d, h, w, C = 2, 3, 4, 8
    m = _perturb(SS3D(C, d_state=2, ssm_ratio=1.0).double())
    x = torch.randn(B, d, h, w, C, dtype=torch.float64)
    t = lambda a, b, c: (a * h + b) * w + c  # noqa: E731  token of voxel (depth a, row b, col c)
    w_fast = [t(a, b, c) for a in range(d) for b in range(h) for c in range(w)]
    h_fast = [t(a, b, c) for a in range(d) for c in range(w) for b in range(h)]
    d_fast = [t(a, b, c) for b in range(h) for c in range(w) for a in range(d)]
    orders = [w_fast, h_fast, d_fast, w_fast[::-1], h_fast[::-1], d_fast[::-1]]
    u = F.conv3d((x @ m.in_proj.weight.T).permute(0, 4, 1, 2, 3), m.conv3d.weight, None, padding=1, groups=m.d_inner)
    tok = F.silu(u).flatten(2).transpose(1, 2)
    y = sum(scatter(loop_scan(m.ssm, k, gather(tok, o)), o, d * h * w) for k, o in enumerate(orders))
    y = F.layer_norm(y, (m.d_inner,), m.out_norm.weight, m.out_norm.bias) @ m.out_proj.weight.T
    torch.testing.assert_close(m(x), y.reshape(B, d, h, w, C), rtol=1e-9, atol=1e-10)


def test_route_mamba_refuses_an_inverse_of_the_wrong_shape_or_device():
    """RouteMamba(x, route, inv): a wrong inverse is a ValueError naming inv, its shape and the need."""
    from mamba_dense.kernels import routes as R
    from mamba_dense.layers.seq_mixer import RouteMamba

    m = RouteMamba(4, num_routes=3, d_state=2)
    route = R.segmamba3d(2, 2, 3)
    x = torch.randn(1, 12, 4)
    with pytest.raises(ValueError, match=r"inv must be routes.inverse\(route, L\) of shape \(3, 12\)"):
        m(x, route, R.inverse(route, 12)[:2])
    torch.testing.assert_close(m(x, route, R.inverse(route, 12)), m(x, route))  # same as the plan's
