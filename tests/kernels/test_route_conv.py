"""The fused route conv (kernels/route_conv.py) against the PyTorch path of seq_mixer.route_conv1d.

On a CPU-only machine the kernels run through Triton's interpreter (TRITON_INTERPRET=1 from
tests/conftest.py, MAMBA_DENSE_TRITON_CPU=1 here). Outputs and gradient buffers are poisoned with
NaN so an element the kernels forget to write fails the comparison.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.kernels import route_conv, routes
from mamba_dense.layers.seq_mixer import RouteMamba, route_conv1d

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)")


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")


def _partial_routes(L: int) -> torch.Tensor:
    """Route 0 visits every token; route 1 only the even ones, with padding steps between; route 2
    the odd ones backwards, then padding: tokens that a route never visits, and -1 steps inside."""
    r0 = torch.arange(L)
    even = torch.arange(0, L, 2)
    r1 = torch.stack([even, torch.full_like(even, -1)], 1).reshape(-1)
    odd = torch.arange(1, L, 2).flip(0)
    r2 = torch.cat([odd, torch.full((r1.numel() - odd.numel(),), -1, dtype=torch.long)])
    S = max(L, r1.numel())
    pad = lambda r: torch.cat([r, torch.full((S - r.numel(),), -1, dtype=torch.long)])  # noqa: E731
    return torch.stack([pad(r0), pad(r1), pad(r2)])


ROUTES = {
    "cross2d-5x7": (lambda: routes.cross2d(5, 7), 35),
    "localmamba-padded-5x6": (lambda: routes.localmamba(5, 6, ("w2", "v_flip", "w7_flip", "h")), 30),
    "segmamba3d-3x4x3": (lambda: routes.segmamba3d(3, 4, 3), 36),
    "partial-routes": (lambda: _partial_routes(11), 11),
    "single-token": (lambda: routes.bidirectional(1), 1),
}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def _reference(u, w, b, route, inv, act):
    plan_pad = bool((route < 0).any())
    y = route_conv1d(u, w, b, route, inv, has_pad=plan_pad, covers=bool((inv >= 0).all()))
    y = F.silu(y) if act else y
    return y.transpose(1, 2)  # (B, L, K, E)


def _inputs(L, K, E, ksz, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, L, 2 * E if strided else E, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    if strided:  # the first half of a (B, L, 2E) tensor, as in RouteMamba (in_proj's output)
        u = u[..., :E]
    w = torch.randn(K, E, ksz, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(K, E, generator=g, dtype=torch.float64)
    return u, w.to(DEVICE), b.to(DEVICE)


def _check(u, w, b, route, inv, act, tol):
    leaves = [t.detach().requires_grad_() for t in (u, w, b) if t is not None]
    lu, lw = leaves[0], leaves[1]
    lb = leaves[2] if b is not None else None
    y = route_conv.route_conv1d_fused(lu, lw, lb, route, inv, act=act)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ru, rw = ref_leaves[0], ref_leaves[1]
    rb = ref_leaves[2] if b is not None else None
    y_ref = _reference(ru, rw, rb, route, inv, act)
    g_ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert y.shape == y_ref.shape and y.dtype == u.dtype and y.is_contiguous()
    assert torch.isfinite(y).all()
    assert _rel(y, y_ref) < tol
    for name, got, ref, leaf in zip(("du", "dw", "db"), grads, g_ref, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref) < tol, (name, _rel(got, ref))


@pytest.mark.parametrize("act", [True, False], ids=["silu", "linear"])
@pytest.mark.parametrize("name", list(ROUTES))
def test_matches_pytorch_path_fp64(name, act):
    rb, L = ROUTES[name]
    route = rb().to(DEVICE)
    inv = routes.inverse(route, L)
    u, w, b = _inputs(L, route.shape[0], 5, 4, torch.float64, seed=len(name))
    _check(u, w, b, route, inv, act, 1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_strided_input_no_bias_other_widths(dtype, tol, monkeypatch):
    """u a strided view, no bias, conv width 2 and 3, E not a multiple of the channel block."""
    monkeypatch.setattr(route_conv, "BLOCK_T", 16)  # several token tiles
    monkeypatch.setattr(route_conv, "MAX_BLOCK_E", 4)  # several channel blocks, a masked tail
    route = routes.localmamba(4, 5, ("w2", "h_flip")).to(DEVICE)
    inv = routes.inverse(route, 20)
    for ksz in (2, 3):
        u, w, _ = _inputs(20, 2, 7, ksz, dtype, seed=ksz, strided=True)
        assert not u.is_contiguous()
        _check(u, w, None, route, inv, True, tol)


def test_route_mamba_same_with_either_path(monkeypatch):
    """RouteMamba (SegMamba's ToM) through the fused conv equals the PyTorch path, values and grads."""
    torch.manual_seed(0)
    m = RouteMamba(6, num_routes=3, d_state=4).double().to(DEVICE)
    route = routes.segmamba3d(2, 3, 4).to(DEVICE)
    x = torch.randn(2, 24, 6, dtype=torch.float64, device=DEVICE)
    outs = []
    for fused in ("1", "0"):
        monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", fused)
        if DEVICE == "cuda" and fused == "0":
            monkeypatch.setattr(route_conv, "use_triton", lambda u: False)
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi, route)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, m.conv1d_weight.grad.clone(), m.conv1d_bias.grad.clone()))
    for a, b in zip(*outs):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("change,words", [
    (dict(u=torch.zeros(2, 5)), "u must be a floating (B, L, E)"),
    (dict(weight=torch.zeros(2, 4, 4)), "weight must have shape (3, 5, d_conv)"),
    (dict(bias=torch.zeros(3, 4)), "bias must have shape (3, 5)"),
    (dict(inv=torch.zeros(3, 7, dtype=torch.long)), "inv must have shape (3, 6)"),
    (dict(route=torch.zeros(3, 6)), "route must be an int64 (K, S)"),
])
def test_bad_input_names_argument_and_shape(change, words):
    route = routes.segmamba3d(1, 2, 3)
    args = dict(u=torch.randn(2, 6, 5), weight=torch.randn(3, 5, 4), bias=torch.randn(3, 5), route=route,
                inv=routes.inverse(route, 6))
    args.update(change)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        route_conv.route_conv1d_fused(**args)


def test_registered_ops_pass_opcheck():
    """Schema, fake implementations, autograd registration and dispatch of the custom ops agree with
    the kernels (torch.library.opcheck), with and without a bias, for a strided u."""
    route = routes.localmamba(4, 5, ("w2", "h_flip")).to(DEVICE)
    inv = routes.inverse(route, 20)
    u, w, b = _inputs(20, 2, 3, 4, torch.float64, seed=5, strided=True)
    u.requires_grad_()
    for bias in (b.requires_grad_(), None):
        torch.library.opcheck(route_conv._fwd_op, (u, w.requires_grad_(), bias, route, inv, True))
        g = torch.randn(2, 20, 2, 3, dtype=torch.float64, device=DEVICE)
        nb = None if bias is None else bias.detach()
        torch.library.opcheck(route_conv._bwd_op, (g, u.detach(), w.detach(), nb, route, inv, True))


def test_route_mamba_compiles_fullgraph_with_the_fused_conv():
    """torch.compile traces RouteMamba as one graph with the route conv (and the scan) as opaque
    ops when it gets the route's inverse on the device (as the encoders pass it, from
    routes.device_route), and gives eager's outputs and gradients."""
    torch.manual_seed(0)
    m = RouteMamba(6, num_routes=3, d_state=4).double().to(DEVICE)
    route = routes.segmamba3d(2, 3, 4).to(DEVICE)
    inv = routes.inverse(route, 24)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(2, 24, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = compiled(x, route, inv)
    g = torch.autograd.grad(y.square().sum(), [x, m.conv1d_weight, m.conv1d_bias])
    x2 = x.detach().clone().requires_grad_()
    y2 = m(x2, route)
    g2 = torch.autograd.grad(y2.square().sum(), [x2, m.conv1d_weight, m.conv1d_bias])
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_route_plan_first_built_in_inference_mode_still_trains():
    """route_plan is cached per route; a plan first made under inference mode (Lightning's validate)
    must still serve a later training step (its inverse is saved for backward)."""
    torch.manual_seed(0)
    m = RouteMamba(8, num_routes=2, d_state=2).to(DEVICE)
    route = routes.bidirectional(10).clone()  # a CPU route, as the encoders pass (moved by to_device)
    with torch.inference_mode():
        m(torch.randn(1, 10, 8, device=DEVICE), route)
    x = torch.randn(1, 10, 8, device=DEVICE, requires_grad=True)
    m(x, route).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_strided_bias_and_indices_past_the_ends(monkeypatch):
    """The kernels read bias[k, e] at ptr + k * E + e: a transposed bias gave wrong numbers (the weight was
    made contiguous, the bias not). Route / inv indices past u were gathered from other memory, silently."""
    route = _partial_routes(9)
    inv = routes.inverse(route, 9).to(DEVICE)
    route = route.to(DEVICE)
    u, w, b = _inputs(9, route.shape[0], 5, 3, torch.float64, seed=3)
    strided = b.t().contiguous().t()  # same values, strides (1, K)
    assert not strided.is_contiguous()
    _check(u, w, strided, route, inv, True, 1e-12)
    bad = route.clone()
    bad[0, 0] = 9  # = L
    with pytest.raises(ValueError, match=r"route \(over the L = 9 tokens of u\)"):
        route_conv.route_conv1d_fused(u, w, b, bad, inv)
    bad_inv = inv.clone()
    bad_inv[0, 0] = route.shape[1]  # a step past the route
    with pytest.raises(ValueError, match="inv is not routes.inverse"):
        route_conv.route_conv1d_fused(u, w, b, route, bad_inv)
    for name in ("weight", "inv"):
        args = {**dict(u=u, weight=w, bias=b, route=route, inv=inv), name: None}
        with pytest.raises(ValueError, match=f"{name} must be a tensor"):
            route_conv.route_conv1d_fused(**args)
    with pytest.raises(ValueError, match="weight must be a floating tensor"):
        route_conv.route_conv1d_fused(u, w.long(), b, route, inv)
