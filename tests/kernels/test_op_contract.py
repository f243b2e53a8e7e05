"""Operator contract: VMamba-style cross scan equivalence, meta device, and bad-input errors."""

import os

import pytest
import torch

from mamba_dense.kernels import routes, selective_scan

from _scan_loop_oracle import scan_loop


def test_vmamba_cross_scan_equivalence_non_square():
    # VMamba's way: copy x into 4 cross-scan sequences (B, K, D, L), scan each, scatter-add back.
    g = torch.Generator().manual_seed(0)
    b, h, w, d, n, K = 2, 3, 5, 4, 2, 4
    L = h * w
    x = torch.randn(b, L, d, generator=g, dtype=torch.float64)
    dt = torch.randn(b, L, K, d, generator=g, dtype=torch.float64)
    A = -torch.rand(K, d, n, generator=g, dtype=torch.float64) - 0.1
    B = torch.randn(b, L, K, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, L, K, n, generator=g, dtype=torch.float64)
    Dp = torch.randn(K, d, generator=g, dtype=torch.float64)
    bias = torch.randn(K, d, generator=g, dtype=torch.float64)

    img = torch.arange(L).view(h, w)
    orders = [img.reshape(-1), img.t().reshape(-1)]
    orders += [o.flip(0) for o in orders]
    y = torch.zeros(b, L, d, dtype=torch.float64)
    for k, order in enumerate(orders):
        xs, dts = x[:, order], dt[:, order, k:k + 1]
        Bs, Cs = B[:, order, k:k + 1], C[:, order, k:k + 1]
        seq = torch.arange(L)[None]
        ys = scan_loop(xs, dts, A[k:k + 1], Bs, Cs, Dp[k:k + 1], bias[k:k + 1], route=seq)
        y[:, order] += ys  # cross-merge: back to token positions
    ours = selective_scan(x, dt, A, B, C, Dp, bias, route=routes.cross2d(h, w))
    torch.testing.assert_close(ours, y, rtol=1e-9, atol=1e-12)


def test_meta_device_shapes_and_backward():
    r = routes.cross2d(3, 4)
    with torch.device("meta"):
        x = torch.randn(2, 12, 8, requires_grad=True)
        dt, B, C = torch.randn(2, 12, 4, 8), torch.randn(2, 12, 4, 2), torch.randn(2, 12, 4, 2)
        A = -torch.rand(4, 8, 2)
    y = selective_scan(x, dt, A, B, C, route=r.to("meta"))
    assert y.device.type == "meta" and y.shape == (2, 12, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    y = selective_scan(x, dt, A, B, C, route=r.to("meta"), merge="none", out_dtype=torch.float32)
    assert y.shape == (2, 12, 4, 8) and y.dtype == torch.float32


def _ok(dev="cpu"):
    x = torch.randn(1, 6, 4)
    kw = dict(x=x, dt=torch.randn(1, 6, 2, 4), A=-torch.rand(2, 4, 3), B=torch.randn(1, 6, 2, 3),
              C=torch.randn(1, 6, 2, 3), D=None, dt_bias=None, route=routes.bidirectional(6))
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _path_device(monkeypatch, triton_path: bool) -> str:
    """The device of a test's inputs: the CPU reference, or the Triton kernels (the GPU, or the CPU through
    Triton's interpreter with MAMBA_DENSE_TRITON_CPU=1)."""
    if not triton_path:
        return "cpu"
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _call(kw):
    kw = dict(kw)
    route = kw.pop("route")
    merge = kw.pop("merge", "sum")
    return selective_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["dt_bias"], route=route, merge=merge)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(x=torch.randn(6, 4)), ["x", "(batch, L, D)", "(6, 4)"]),
        (dict(dt=torch.randn(1, 6, 4)), ["dt", "(1, 6, 2, 4)", "(1, 6, 4)"]),
        (dict(A=-torch.rand(2, 5, 3)), ["A", "(2, 4, 3)", "(2, 5, 3)"]),
        (dict(B=torch.randn(1, 6, 2, 4)), ["B", "(1, 6, 2, 3)"]),
        (dict(C=torch.randn(1, 7, 2, 3)), ["C", "(1, 6, 2, 3)"]),
        (dict(D=torch.randn(4)), ["D", "(2, 4)"]),
        (dict(dt_bias=torch.randn(3, 4)), ["dt_bias", "(2, 4)"]),
        (dict(route=torch.tensor([[0, 1, 6], [5, 4, 3]])), ["route", "[-1, L)", "6"]),
        (dict(route=torch.tensor([[0, -2, 1], [5, 4, 3]])), ["route", "[-1, L)"]),
        (dict(route=torch.tensor([[0.0, 1.0]])), ["route", "int64"]),
        (dict(route=torch.tensor([0, 1])), ["route", "(K, S)"]),
        (dict(route=torch.arange(6)[None]), ["route", "(1, 6) has 1 rows", "K = 2 routes"]),  # not a dt error
        (dict(x=torch.randn(1, 4, 6).transpose(1, 2)), ["x", "contiguous"]),
        (dict(x=torch.randint(0, 3, (1, 6, 4))), ["x", "dtype", "(1, 6, 4)", "float32"]),
        (dict(B=torch.randn(1, 6, 2, 3, device="meta")), ["B", "device", "(1, 6, 2, 3)", "meta"]),
        (dict(merge="mean"), ["merge", "mean"]),
    ],
)
def test_bad_input_names_argument_and_shape(change, words):
    kw = _ok()
    kw.update(change)
    with pytest.raises(ValueError) as e:
        _call(kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)


def test_state_size_above_the_gpu_limit_is_a_clear_error():
    """Above MAX_TRITON_STATE states a GPU program would need more than a CUDA block's 1024 threads (N = 2048
    failed inside Triton with OutOfResources on the H100): the GPU path (and the meta device, which takes
    it) raises a ValueError naming A, its shape and the limit; the CPU reference still runs."""
    from mamba_dense import kernels

    N = kernels.MAX_TRITON_STATE + 1
    kw = _ok()
    kw.update(A=-torch.rand(2, 4, N) - 0.5, B=torch.randn(1, 6, 2, N), C=torch.randn(1, 6, 2, N))
    with pytest.raises(ValueError) as e:
        _call({k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    for w in ("A", f"(2, 4, {N})", str(kernels.MAX_TRITON_STATE)):
        assert w in str(e.value), (w, str(e.value))
    y = _call(kw)  # CPU: the reference
    assert y.shape == (1, 6, 4) and torch.isfinite(y).all()


def test_route_range_check_not_fooled_by_cache():
    # the range check is cached per route tensor; a new tensor with bad values must still be caught
    kw = _ok()
    _call(kw)
    for _ in range(3):
        bad = routes.bidirectional(6).clone()
        bad[0, 0] = 6
        kw["route"] = bad
        with pytest.raises(ValueError, match=r"\[-1, L\)"):
            _call(kw)
        bad[0, 0] = 1  # in-place change bumps the version: checked again (now a repeat of token 1)
        with pytest.raises(ValueError, match="more than once"):
            _call(kw)



@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_route_caches_do_not_keep_routes_alive(monkeypatch, triton_path):
    """The per-route caches (the value check, the Triton path's coverage / int32 copy, the device copy of
    a CPU route) must not hold the routes they saw: a caller passing a fresh route per call would
    otherwise keep every one alive (found by an exploratory run: 200 routes of 2 MiB held 400 MiB)."""
    import gc
    import weakref

    import mamba_dense.kernels as mk
    from mamba_dense.kernels import triton_scan as ts

    dev = _path_device(monkeypatch, triton_path)
    kw = _ok(dev)
    refs = []
    for _ in range(5):
        route = routes.bidirectional(6).to(dev, copy=True)  # a fresh tensor each call
        kw["route"] = route
        routes.to_device(route.cpu(), dev)  # the encoders' path: a CPU route's device copy, cached
        _call(kw)
        refs.append(weakref.ref(route))
        del route
        kw.pop("route")
    gc.collect()
    assert all(r() is None for r in refs)  # freed once the caller drops them
    for cache in (mk._RANGE_CACHE, ts._ROUTE_INFO, routes._DEVICE_CACHE):
        assert all(hit[0]() is not None for hit in cache.values())  # and no entry outlives its route
    kept = routes.bidirectional(6).clone().to(dev)
    kw["route"] = kept
    _call(kw)
    key = (kept.data_ptr(), tuple(kept.shape), str(kept.device), kept._version)
    if kept.device.type != "cpu":
        assert mk._RANGE_CACHE[key][0]() is kept  # a live route keeps its entry
    else:  # a CPU route is checked at every call (cheap there; edits through .numpy() move no version)
        assert key not in mk._RANGE_CACHE
    if triton_path:
        assert any(hit[0]() is kept for hit in ts._ROUTE_INFO.values())


@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_route_that_visits_a_token_twice_is_rejected(monkeypatch, triton_path):
    # the kernels write a route's output once per token (the reference would add both visits), and a
    # route's coverage count would claim a token it never visits: one clear error on every path
    dev = _path_device(monkeypatch, triton_path)
    kw = _ok(dev)
    kw["route"] = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 1, -1, 2, 1]], device=dev)
    with pytest.raises(ValueError) as e:
        _call(kw)
    msg = str(e.value)
    for w in ("route row 1", "token 1", "steps 2 and 5", "at most once"):
        assert w in msg, (w, msg)
    kw["route"] = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, -1, -1, 2, 1]], device=dev)  # repeated padding is fine
    assert _call(kw).shape == (1, 6, 4)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or TRITON_INTERPRET=1")
def test_compiled_scan_still_checks_route_values(monkeypatch):
    # selective_scan's own value check needs a sync, so it stands aside while torch.compile traces it;
    # the registered op checks the route at run time instead (before any kernel reads out of bounds)
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw = _ok(dev)
    f = torch.compile(lambda route, *a: selective_scan(*a, route=route), backend="aot_eager", fullgraph=True)
    args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"])
    torch.testing.assert_close(f(kw["route"], *args), _call(kw))
    with pytest.raises(ValueError, match=r"\[-1, L\) with L = 6 .*\[0, 6\]"):
        f(torch.tensor([[0, 1, 2, 3, 4, 6], [5, 4, 3, 2, 1, 0]], device=dev), *args)
    with pytest.raises(ValueError, match="route row 0 visits token 2 more than once"):
        f(torch.tensor([[0, 1, 2, 2, 4, 5], [5, 4, 3, 2, 1, 0]], device=dev), *args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_reference_checks_route_values(monkeypatch, backend):
    # the CPU reference under torch.compile: selective_scan's own value check stands aside while tracing,
    # and mamba_dense::checked_route runs it at every call (before, a bad index reached the reference's
    # gather as torch's IndexError / RuntimeError)
    monkeypatch.delenv("MAMBA_DENSE_TRITON_CPU", raising=False)
    torch._dynamo.reset()
    kw = _ok("cpu")
    f = torch.compile(lambda route, *a: selective_scan(*a, route=route), backend=backend, fullgraph=True)
    args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"])
    torch.testing.assert_close(f(kw["route"], *args), _call(kw))
    with pytest.raises(ValueError, match=r"\[-1, L\) with L = 6 .*\[-3, 5\]"):
        f(torch.tensor([[0, 1, 2, 3, 4, -3], [5, 4, 3, 2, 1, 0]]), *args)
    with pytest.raises(ValueError, match="route row 1 visits token 4 more than once"):
        f(torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 4, 2, 1, 0]]), *args)
    # a valid route with padding steps still runs (and matches eager)
    pad = torch.tensor([[0, 1, -1, 2, 3, 4, 5], [5, 4, 3, -1, 2, 1, 0]])
    torch.testing.assert_close(f(pad, *args), _call(dict(kw, route=pad)))


def test_routes_made_in_inference_mode():
    # routes built (and cached) inside torch.inference_mode() have no version counter
    kw = _ok()
    with torch.inference_mode():
        kw["route"] = routes.bidirectional(6).clone()
        y = _call(kw)
    assert y.shape == (1, 6, 4)
    y2 = _call(kw)  # the same inference-mode route used again outside
    torch.testing.assert_close(y, y2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_kernels_launch_on_the_inputs_gpu_not_the_current_one():
    """Triton launches on the current CUDA device: the ops must switch to their inputs' device."""
    from mamba_dense.kernels import routes as R
    from mamba_dense.kernels import selective_scan
    from mamba_dense.kernels.instance_norm import instance_norm_act
    from mamba_dense.kernels.reference import selective_scan_ref

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator().manual_seed(0)
    b, h, w, K, Dm, N = 2, 6, 5, 4, 8, 4
    L = h * w
    x, dt = torch.randn(b, L, Dm, generator=g), torch.randn(b, L, K, Dm, generator=g)
    A = -torch.rand(K, Dm, N, generator=g) - 0.5
    B, C = torch.randn(b, L, K, N, generator=g), torch.randn(b, L, K, N, generator=g)
    route = R.cross2d(h, w)
    ins = [t.to(dev).requires_grad_() for t in (x, dt, A, B, C)]
    y = selective_scan(*ins, route=route.to(dev))
    gx = torch.autograd.grad(y.sum(), ins[0])[0]
    ref_ins = [t.double().requires_grad_() for t in (x, dt, A, B, C)]
    y_ref = selective_scan_ref(*ref_ins, route=route)
    gx_ref = torch.autograd.grad(y_ref.sum(), ref_ins[0])[0]
    assert y.device == dev and torch.allclose(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(gx.double().cpu(), gx_ref, rtol=1e-4, atol=1e-4)
    v = torch.randn(2, 3, 4, 5, 6, generator=g) * 2 + 1
    yn = instance_norm_act(v.to(dev), act="relu")
    assert torch.allclose(yn.cpu(), torch.relu(torch.group_norm(v, 3)), rtol=1e-4, atol=1e-4)
    # the route conv (forward and backward)
    from mamba_dense.kernels.route_conv import route_conv1d_fused
    from mamba_dense.layers.seq_mixer import route_conv1d

    u, wc, bc = torch.randn(2, L, Dm, generator=g), torch.randn(K, Dm, 4, generator=g), torch.randn(K, Dm, generator=g)
    inv = R.inverse(route, L)
    ins = [t.to(dev).requires_grad_() for t in (u, wc, bc)]
    yc = route_conv1d_fused(*ins, route.to(dev), inv.to(dev))
    gc = torch.autograd.grad(yc.square().sum(), ins)
    ref_ins = [t.double().requires_grad_() for t in (u, wc, bc)]
    yc_ref = torch.nn.functional.silu(route_conv1d(*ref_ins, route, inv)).transpose(1, 2)
    gc_ref = torch.autograd.grad(yc_ref.square().sum(), ref_ins)
    assert yc.device == dev and torch.allclose(yc.double().cpu(), yc_ref, rtol=1e-4, atol=1e-4)
    for a, r in zip(gc, gc_ref):
        assert torch.allclose(a.double().cpu(), r, rtol=1e-4, atol=1e-3)
    # the upsampled cross-entropy
    from mamba_dense.tasks._upsample_ce import upsampled_cross_entropy

    logits, target = torch.randn(2, 5, 6, 7, generator=g), torch.randint(0, 5, (2, 24, 28), generator=g)
    loss = upsampled_cross_entropy(logits.to(dev), target.to(dev), impl="triton")
    loss_ref = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(logits.double(), (24, 28), mode="bilinear", align_corners=False), target)
    assert loss.device == dev and abs(float(loss) - float(loss_ref)) < 1e-4 * abs(float(loss_ref))


def test_route_edited_where_no_version_counts_is_checked_again():
    """The value check was cached by the route's version: a route made under inference_mode (no version
    counter, Lightning's validation) or edited through .numpy() kept passing after an edit that put a token
    twice or past L, which then failed in the reference's gather or ran silently."""
    kw = _ok("cpu")
    with torch.inference_mode():
        route = routes.bidirectional(6).clone()
        _call(dict(kw, route=route))
        route[0, 5] = route[0, 3]
        with pytest.raises(ValueError, match="more than once"):
            _call(dict(kw, route=route))
    route = routes.bidirectional(6).clone()
    _call(dict(kw, route=route))
    route.numpy()[0, 5] = 100
    with pytest.raises(ValueError, match=r"\[-1, L\)"):
        _call(dict(kw, route=route))


def test_bad_shape_under_fullgraph_dynamic_compile_keeps_the_value_error():
    """Dynamo could not format symbolic sizes into the message, and the ValueError was lost."""
    kw = _ok("cpu")
    kw["B"] = kw["B"][:, :-1].contiguous()
    f = torch.compile(lambda **k: selective_scan(**k), backend="eager", dynamic=True, fullgraph=True)
    with pytest.raises(Exception) as info:
        f(**kw)
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any("B must have shape (batch, L, K, N)" in str(e) for e in chain), chain
