"""The experimental sequential forward (kernels/triton_scan_seq.py, MAMBA_DENSE_SCAN_IMPL=seq).

Forward against the fp64 reference, gradients through the public op (the default backward runs on
the states the sequential forward saved), and those states against the default forward's. On a
CPU-only machine the kernels run in Triton's interpreter (tests/conftest.py), tiny shapes; outputs
are poisoned with NaN so an element the kernels forget to write fails.
"""

import os

import pytest
import torch

from mamba_dense.kernels import routes, selective_scan, selective_scan_ref
from mamba_dense.kernels import triton_scan as ts
from mamba_dense.kernels import triton_scan_seq as sq

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)"
)


@pytest.fixture(autouse=True)
def _seq_on_cpu(monkeypatch):
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")
    monkeypatch.setenv("MAMBA_DENSE_SCAN_IMPL", "seq")
    monkeypatch.delenv("MAMBA_DENSE_SEQ_CFG", raising=False)
    monkeypatch.delenv("MAMBA_DENSE_SEQ_PROGRAMS_PER_SM", raising=False)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _inputs(batch, L, K, Dm, N, dtype, seed, x_per_route=False):
    """x, dt, A, B, C, D, dt_bias; x, dt, B, C in ``dtype``, the parameters fp32 (fp64 for fp64)."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, sc=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * sc  # noqa: E731
    x = t(batch, L, K, Dm) if x_per_route else t(batch, L, Dm)
    acts = [x, t(batch, L, K, Dm, sc=0.7), t(batch, L, K, N), t(batch, L, K, N)]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    params = [-torch.exp(t(K, Dm, N, sc=0.5)), t(K, Dm), t(K, Dm, sc=0.3)]
    x, dt, B, C = (a.to(DEVICE, dtype) for a in acts)
    A, Dp, bias = (p.to(DEVICE, pdt) for p in params)
    return [x, dt, A, B, C, Dp, bias]


def _window_route():
    # w7 on a 5x6 grid: 49 steps, 19 of them padding (-1); h_flip is padded at the end to 49
    return routes.localmamba(5, 6, ("w2", "h_flip", "w7_flip"))


FWD_CASES = [
    # id, route builder, L, Dm, N, merge, x per route, MAMBA_DENSE_SEQ_CFG, programs per SM (chunking)
    ("cross2d-N1", lambda: routes.cross2d(4, 5), 20, 20, 1, "sum", False, None, None),
    ("cross2d-N4-bd8-noprefetch", lambda: routes.cross2d(3, 5), 15, 12, 4, "sum", False, "8,1,2,0", None),
    ("window-pad-none", _window_route, 30, 10, 3, "none", False, "16,1,1,1", None),
    ("per-route-x", lambda: routes.localmamba(3, 5, ("h", "v_flip", "w2")), 15, 6, 2, "sum", True, None, None),
    ("window-N16-chunked", lambda: routes.localmamba(5, 6, ("w7", "v")), 30, 8, 16, "sum", False, None, 1000),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_forward_matches_reference(case, dtype, monkeypatch):
    name, rb, L, Dm, N, merge, xpr, cfg, pps = case
    if cfg:
        monkeypatch.setenv("MAMBA_DENSE_SEQ_CFG", cfg)
    if pps:
        monkeypatch.setenv("MAMBA_DENSE_SEQ_PROGRAMS_PER_SM", str(pps))
    route = rb().to(DEVICE)
    K, S = route.shape
    args = _inputs(2, L, K, Dm, N, dtype, seed=len(name) * 7 + N, x_per_route=xpr)
    if pps:  # the automatic policy must have cut the route into several chunks
        plan = sq.seq_plan(2, L, Dm, N, K, S, dtype, DEVICE)
        assert plan["n_chunks"] > 1, plan
    y = selective_scan(*args, route=route, merge=merge)
    ref = selective_scan_ref(*[a.double() for a in args], route=route, merge=merge)
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert _rel(y, ref) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_forward_options_fp16_no_bias_no_softplus():
    """fp16 inputs, fp32 output, no D / dt_bias, dt used as delta directly."""
    route = routes.cross2d(3, 4).to(DEVICE)
    x, dt, A, B, C, _, _ = _inputs(2, 12, 4, 10, 2, torch.float16, seed=21)
    dt = (dt.abs() * 0.3).to(torch.float16)  # delta = dt must be positive without softplus
    y = selective_scan(x, dt, A, B, C, route=route, dt_softplus=False, out_dtype=torch.float32)
    ref = selective_scan_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), route=route,
                             dt_softplus=False)
    assert y.dtype == torch.float32
    assert _rel(y, ref) < 1e-5


def test_int64_offsets(monkeypatch):
    """The int64 per-token offset path (taken when one batch element spans >= 2^31 elements)."""
    monkeypatch.setattr(sq, "_OFF64_LIMIT", 0)
    route = _window_route().to(DEVICE)
    args = _inputs(2, 30, route.shape[0], 6, 2, torch.float64, seed=5)
    y, _ = ts.scan_fwd(*args, route, "sum", True, torch.float64, False)
    ref = selective_scan_ref(*args, route=route)
    assert _rel(y, ref) < 1e-12


GRAD_CASES = [
    # id, dtype, route builder, L, Dm, N, merge, programs per SM (chunking), tolerance
    ("fp64-window-chunked-sum", torch.float64, _window_route, 30, 6, 4, "sum", 1000, 1e-10),
    ("fp64-window-none", torch.float64, _window_route, 30, 5, 1, "none", None, 1e-10),
    ("fp32-cross2d", torch.float32, lambda: routes.cross2d(3, 6), 18, 12, 2, "sum", None, 1e-4),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_forward_backward_through_op(case, monkeypatch):
    """Gradients of the public op with the sequential forward: the default backward recomputes
    every tile from the states the sequential forward saved, so they must have its layout."""
    _, dtype, rb, L, Dm, N, merge, pps, tol = case
    if pps:
        monkeypatch.setenv("MAMBA_DENSE_SEQ_PROGRAMS_PER_SM", str(pps))
    route = rb().to(DEVICE)
    K = route.shape[0]
    args = _inputs(2, L, K, Dm, N, dtype, seed=13)
    leaves = [a.clone().requires_grad_() for a in args]
    y = selective_scan(*leaves, route=route, merge=merge)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    g = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    ref_leaves = [a.detach().double().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*ref_leaves, route=route, merge=merge)
    g_ref = torch.autograd.grad(y_ref, ref_leaves, dy)
    assert _rel(y, y_ref) < tol
    for nm, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), g, g_ref):
        assert torch.isfinite(a).all(), nm
        assert _rel(a, b) < tol, nm


@pytest.mark.parametrize("tpc", [None, 2], ids=["one-chunk", "chunks-of-2-tiles"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_saved_states_equal_default(dtype, tpc, monkeypatch):
    route = routes.localmamba(6, 6, ("w7", "h_flip")).to(DEVICE)  # S = 49: several tiles, padding
    K = route.shape[0]
    args = _inputs(2, 36, K, 6, 4, dtype, seed=17)
    monkeypatch.setenv("MAMBA_DENSE_SCAN_IMPL", "default")
    y0, st0 = ts.scan_fwd(*args, route, "sum", True, dtype, True, tiles_per_chunk=tpc)
    monkeypatch.setenv("MAMBA_DENSE_SCAN_IMPL", "seq")
    y1, st1 = ts.scan_fwd(*args, route, "sum", True, dtype, True, tiles_per_chunk=tpc)
    T = ts._config(4, 6, dtype)[0]
    assert st1.shape == st0.shape == (2, K, -(-route.shape[1] // T), 4, 6)
    assert st1.dtype == st0.dtype
    assert torch.isfinite(st1).all()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st1, st0, **tol)
    torch.testing.assert_close(y1, y0, **tol)


def test_impl_switch(monkeypatch):
    """Default unchanged without the variable; 'seq' dispatches; anything else is refused."""
    calls = []
    real = sq.scan_fwd_seq

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(sq, "scan_fwd_seq", spy)
    route = routes.bidirectional(8).to(DEVICE)
    args = _inputs(1, 8, 2, 4, 1, torch.float64, seed=1)
    monkeypatch.delenv("MAMBA_DENSE_SCAN_IMPL")
    y0, _ = ts.scan_fwd(*args, route, "sum", True, torch.float64, False)
    assert calls == []
    monkeypatch.setenv("MAMBA_DENSE_SCAN_IMPL", "seq")
    y1, _ = ts.scan_fwd(*args, route, "sum", True, torch.float64, False)
    assert calls == [1]
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("MAMBA_DENSE_SCAN_IMPL", "sequential")
    with pytest.raises(ValueError, match="MAMBA_DENSE_SCAN_IMPL"):
        ts.scan_fwd(*args, route, "sum", True, torch.float64, False)
