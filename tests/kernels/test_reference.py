"""kernels/reference.py against a step-by-step fp64 loop, on hypothesis-drawn shapes and routes."""

import torch
from hypothesis import given, settings, strategies as st

from mamba_dense.kernels import routes, selective_scan, selective_scan_ref

from _scan_loop_oracle import scan_loop


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 2))
    L = draw(st.integers(1, 37))
    K = draw(st.sampled_from([1, 2, 4, 8]))
    N = draw(st.sampled_from([1, 4, 16]))
    Dm = draw(st.integers(1, 19))
    pad = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(K):
        perm = torch.randperm(L, generator=g)
        keep = perm[: draw(st.integers(1, L))] if draw(st.booleans()) else perm  # some routes skip tokens
        steps = torch.cat([keep, torch.full((pad,), -1, dtype=torch.long)])
        rows.append(steps[torch.randperm(steps.numel(), generator=g)])
    S = max(r.numel() for r in rows)
    route = torch.stack([torch.cat([r, torch.full((S - r.numel(),), -1, dtype=torch.long)]) for r in rows])
    x = torch.randn(batch, L, Dm, generator=g, dtype=torch.float64)
    dt = torch.randn(batch, L, K, Dm, generator=g, dtype=torch.float64)
    A = -torch.exp(torch.randn(K, Dm, N, generator=g, dtype=torch.float64) * 0.5)
    B = torch.randn(batch, L, K, N, generator=g, dtype=torch.float64)
    C = torch.randn(batch, L, K, N, generator=g, dtype=torch.float64)
    D = torch.randn(K, Dm, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    bias = torch.randn(K, Dm, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    softplus = draw(st.booleans())
    if not softplus:
        # without softplus dt + dt_bias is the step size itself, which is >= 0 in Mamba; a negative one
        # makes exp(delta * A) > 1 and the state grows like e^(L |A| |delta|) (1e122 drawn once), where
        # two fp64 summation orders stop agreeing to 1e-6 and the error norm can overflow
        dt = dt.abs()
        bias = bias.abs() if bias is not None else None
    return dict(
        args=(x, dt, A, B, C, D, bias), route=route,
        merge=draw(st.sampled_from(["sum", "none"])), dt_softplus=softplus,
        chunk=draw(st.sampled_from([1, 3, 8, 64])),
    )


@settings(max_examples=60, deadline=None)
@given(problems())
def test_reference_matches_loop(p):
    kw = dict(route=p["route"], merge=p["merge"], dt_softplus=p["dt_softplus"])
    ref = selective_scan_ref(*p["args"], chunk=p["chunk"], **kw)
    loop = scan_loop(*p["args"], **kw)
    assert ref.shape == loop.shape
    if loop.abs().max() == 0:  # every visited output zero only if nothing was visited
        assert ref.abs().max() == 0
    else:
        assert _rel(ref, loop) < 1e-6


def test_public_cpu_path_is_the_reference():
    g = torch.Generator().manual_seed(0)
    route = routes.cross2d(3, 5)
    x = torch.randn(2, 15, 6, generator=g)
    dt, B, C = torch.randn(2, 15, 4, 6, generator=g), torch.randn(2, 15, 4, 3, generator=g), torch.randn(2, 15, 4, 3, generator=g)
    A = -torch.rand(4, 6, 3, generator=g) - 0.1
    y = selective_scan(x, dt, A, B, C, route=route)
    assert y.dtype == torch.float32 and y.shape == (2, 15, 6)
    assert _rel(y, scan_loop(x, dt, A, B, C, route=route)) < 1e-5


def test_padding_step_decays_state_without_output():
    # one token, then a padding step, then a second token: the padding step must decay the state
    # by exp(softplus(dt_bias) * A) and produce nothing
    x = torch.tensor([[[1.0], [2.0]]], dtype=torch.float64)
    dt = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    A = torch.full((1, 1, 1), -0.7, dtype=torch.float64)
    B = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    C = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    bias = torch.full((1, 1), 0.3, dtype=torch.float64)
    route = torch.tensor([[0, -1, 1]])
    y = selective_scan_ref(x, dt, A, B, C, None, bias, route=route)
    delta = torch.nn.functional.softplus(torch.tensor(0.3, dtype=torch.float64))
    a = torch.exp(delta * -0.7)
    h0 = delta * 1.0
    h1 = a * a * h0 + delta * 2.0
    torch.testing.assert_close(y[0, :, 0], torch.stack([h0, h1]))


def test_gradcheck_reference_all_inputs():
    g = torch.Generator().manual_seed(1)
    route = torch.tensor([[0, 2, -1, 1], [1, -1, 0, 2]])
    args = [
        torch.randn(1, 3, 2, generator=g, dtype=torch.float64),
        torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64),
        -torch.rand(2, 2, 3, generator=g, dtype=torch.float64) - 0.2,
        torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64),
        torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 2, generator=g, dtype=torch.float64),
    ]
    args = [a.requires_grad_() for a in args]
    for merge in ("sum", "none"):
        assert torch.autograd.gradcheck(lambda *a: selective_scan_ref(*a, route=route, merge=merge, chunk=2), args)


def test_per_route_x_equals_separate_single_route_scans():
    g = torch.Generator().manual_seed(4)
    route = routes.bidirectional(9)
    x = torch.randn(1, 9, 2, 3, generator=g, dtype=torch.float64)
    dt = torch.randn(1, 9, 2, 3, generator=g, dtype=torch.float64)
    A = -torch.rand(2, 3, 4, generator=g, dtype=torch.float64) - 0.1
    B, C = torch.randn(1, 9, 2, 4, generator=g, dtype=torch.float64), torch.randn(1, 9, 2, 4, generator=g, dtype=torch.float64)
    y = selective_scan_ref(x, dt, A, B, C, route=route)
    parts = [
        scan_loop(x[:, :, k], dt[:, :, k:k + 1], A[k:k + 1], B[:, :, k:k + 1], C[:, :, k:k + 1], route=route[k:k + 1])
        for k in range(2)
    ]
    torch.testing.assert_close(y, parts[0] + parts[1])
