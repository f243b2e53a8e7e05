"""torch.compile of the encoders' layers: routes are graph constants, the scan op is opaque, so a
whole SS2D mixer traces as one graph (``fullgraph=True``) and matches eager at several sizes."""

import pytest
import torch

from mamba_dense.layers import SS2D

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _registered_op(monkeypatch) -> str:
    """The device on which the registered Triton op runs: the GPU, or CPU tensors through Triton's
    interpreter (MAMBA_DENSE_TRITON_CPU=1; TRITON_INTERPRET=1 comes from tests/conftest.py)."""
    if DEVICE == "cpu":
        monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    return DEVICE


@pytest.mark.parametrize("via_op", [False, True], ids=["reference", "registered-op"])
def test_ss2d_compiles_fullgraph_and_matches_eager(monkeypatch, via_op):
    dev = _registered_op(monkeypatch) if via_op else "cpu"  # the reference path is the CPU's
    torch.manual_seed(0)
    m = SS2D(8, d_state=2, ssm_ratio=1.0).double().to(dev)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    for h, w in ((3, 5), (4, 4), (3, 5)):  # a new size retraces; a repeated one reuses the graph
        x = torch.randn(2, h, w, 8, dtype=torch.float64, device=dev, requires_grad=True)
        y = compiled(x)
        g = torch.autograd.grad(y.square().sum(), [x, m.ssm.dt_projs_weight])
        x2 = x.detach().clone().requires_grad_()
        y2 = m(x2)
        g2 = torch.autograd.grad(y2.square().sum(), [x2, m.ssm.dt_projs_weight])
        assert y.shape == (2, h, w, 8)
        torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-12)
        for a, b in zip(g, g2):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_routes_first_built_in_inference_mode_still_train(monkeypatch):
    """Lightning validates under inference_mode; a route cached there must not be an inference
    tensor, or the next training step at that size fails to save it for backward."""
    dev = _registered_op(monkeypatch)  # the registered op saves the route for backward
    torch.manual_seed(0)
    m = SS2D(8, d_state=2, ssm_ratio=1.0).to(dev)
    with torch.inference_mode():
        m(torch.randn(1, 5, 7, 8, device=dev))  # first sight of a 5x7 map: routes built and cached here
    route = m.routes_for(5, 7)
    assert not route.is_inference()
    x = torch.randn(1, 5, 7, 8, device=dev, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_compiled_after_eager_warmup_reuses_the_cached_route(monkeypatch):
    """After one eager step, the compiled graph takes the cached device route itself (a graph input),
    so the scan's per-route coverage cache stops growing: no device sync per call on a GPU."""
    from mamba_dense.kernels import triton_scan as ts

    dev = _registered_op(monkeypatch)
    torch.manual_seed(0)
    m = SS2D(8, d_state=1).to(dev)
    m(torch.randn(1, 3, 6, 8, device=dev))  # eager warm-up at this size
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    sizes = []
    for _ in range(3):
        x = torch.randn(1, 3, 6, 8, device=dev, requires_grad=True)
        y = compiled(x)
        y.square().sum().backward()
        torch.testing.assert_close(y, m(x))
        sizes.append(len(ts._ROUTE_INFO))
    assert sizes[0] == sizes[1] == sizes[2]


@pytest.mark.parametrize("name, kw", [
    ("himamba_tiny", {}),
    ("himamba_tiny", {"num_registers": 3}),
    ("localvmamba_tiny", {"directions": [("h", "v_flip", "w7", "w2_flip")] * 4}),
    ("vmamba_tiny", {"num_registers": 2}),
])
def test_hierarchical_encoders_trace_as_one_graph(name, kw):
    """Every hierarchical 2D family traces with fullgraph=True (the README's promise) and matches
    eager: their blocks fetch cached device routes (routes.device_route). Hi-Mamba built its routes
    in every forward, which broke the graph (found by an exploratory run)."""
    import timm

    import mamba_dense.encoders  # noqa: F401  (registers the encoders in timm)

    torch.manual_seed(0)
    m = timm.create_model(name, features_only=True, depths=(1, 1, 1, 1), dims=16, **kw).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        eager = m(x)  # the eager warm-up caches the routes at this size
        compiled = torch.compile(m, backend="eager", fullgraph=True, dynamic=False)(x)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_default_compile_follows_a_new_input_size():
    """torch.compile's default (dynamic=None) makes a size symbolic once it changes; the route
    lookup hashed that SymInt and crashed at the second size. Sizes are now specialized there."""
    import timm

    import mamba_dense.encoders  # noqa: F401

    torch.manual_seed(0)
    m = timm.create_model("vmamba_tiny", features_only=True, depths=(1, 1, 1, 1), dims=16).eval()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad():
        for h, w in ((64, 96), (32, 64), (48, 48)):
            x = torch.randn(1, 3, h, w)
            for a, b in zip(compiled(x), m(x)):
                torch.testing.assert_close(a, b)
