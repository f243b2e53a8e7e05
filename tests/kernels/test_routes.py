"""Route builders: shapes, permutations, windows with padding, 3D orders, registers, inverses."""

import pytest
import torch

from mamba_dense.kernels import routes


def _is_perm(r, n):
    v = r[r >= 0]
    return v.numel() == n and torch.equal(torch.sort(v).values, torch.arange(n))


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 4), (7, 7), (3, 11)])
def test_cross2d(h, w):
    r = routes.cross2d(h, w)
    assert r.shape == (4, h * w) and r.dtype == torch.long
    for k in range(4):
        assert _is_perm(r[k], h * w)
    grid = torch.arange(h * w).view(h, w)
    assert torch.equal(r[0], grid.reshape(-1))
    assert torch.equal(r[1], grid.t().reshape(-1))
    assert torch.equal(r[2], r[0].flip(0)) and torch.equal(r[3], r[1].flip(0))


@pytest.mark.parametrize("h,w,k", [(5, 7, 2), (7, 7, 7), (9, 4, 7), (1, 3, 2)])
@pytest.mark.parametrize("column_first", [False, True])
def test_window_pads_and_keeps_padding_in_sequence(h, w, k, column_first):
    r = routes.window(h, w, k, column_first=column_first)
    hp, wp = -(-h // k) * k, -(-w // k) * k
    assert r.numel() == hp * wp
    assert int((r < 0).sum()) == hp * wp - h * w
    assert _is_perm(r, h * w)
    # the first window holds exactly the tokens of the top-left k x k block (padding where outside)
    first = r[: k * k]
    expect = {i * w + j for i in range(min(k, h)) for j in range(min(k, w))}
    assert set(first[first >= 0].tolist()) == expect


def test_localmamba_directions_padded_to_same_length():
    r = routes.localmamba(5, 9, ("h", "w7_flip", "v", "w2"))
    assert r.shape[0] == 4 and r.shape[1] == 7 * 14
    for k in range(4):
        assert _is_perm(r[k], 45)
    with pytest.raises(ValueError, match="unknown LocalMamba direction"):
        routes.localmamba(4, 4, ("diag",))


@pytest.mark.parametrize("h,w", [(3, 5), (6, 2), (4, 4)])
def test_inverse_non_square(h, w):
    r = routes.localmamba(h, w, ("h", "v_flip", "w2", "w7_flip"))
    inv = routes.inverse(r, h * w)
    for k in range(r.shape[0]):
        # route[k, inv[k, t]] == t for every token
        assert torch.equal(r[k, inv[k]], torch.arange(h * w))
    # the column-scan inverse must map each token back to its own (i, j) position on H != W
    v = routes.column(h, w)
    back = torch.arange(h * w)[v][routes.inverse(v, h * w)]
    assert torch.equal(back, torch.arange(h * w))


def test_3d_orders():
    d, h, w = 2, 3, 4
    r = routes.axes3d(d, h, w)
    assert r.shape == (6, d * h * w)
    g = torch.arange(d * h * w).view(d, h, w)
    assert torch.equal(r[0], g.reshape(-1))
    assert torch.equal(r[2][:d], g[:, 0, 0])  # depth fastest: first steps walk through slices
    assert torch.equal(r[3], r[0].flip(0))
    s = routes.segmamba3d(d, h, w)
    assert s.shape == (3, d * h * w) and torch.equal(s[2], r[2])
    for k in range(3):
        assert _is_perm(s[k], d * h * w)


def test_registers_evenly_spaced_never_at_ends():
    base = routes.bidirectional(20)
    r = routes.with_registers(base, 20, 3)
    assert r.shape == (2, 23)
    pos = [int((r[0] == 20 + i).nonzero()) for i in range(3)]
    assert pos == sorted(pos) and pos[0] > 0 and pos[-1] < 22
    gaps = torch.diff(torch.tensor([-1] + pos + [23]))
    assert int(gaps.max() - gaps.min()) <= 1
    assert routes.with_registers(base, 20, 0) is base
    assert _is_perm(r[1], 23)


def test_check_route_rejects_repeats_and_range():
    routes.check_route(routes.cross2d(2, 2), 4)
    with pytest.raises(ValueError, match="at most once"):
        routes.check_route(torch.tensor([[0, 1, 1]]), 3)
    with pytest.raises(ValueError, match=r"\[-1, L\)"):
        routes.check_route(torch.tensor([[0, 3]]), 3)


def test_builders_stay_on_cpu_inside_meta_context():
    # builders are cached: a route built while a model is constructed on the meta device must not
    # come back as a meta tensor later
    with torch.device("meta"):
        built = [routes.cross2d(3, 7), routes.localmamba(3, 7, ("h", "w7_flip")), routes.window(3, 7, 2),
                 routes.bidirectional(5), routes.axes3d(2, 3, 4), routes.segmamba3d(2, 3, 4),
                 routes.with_registers(routes.cross2d(3, 7), 21, 2)]
    assert all(r.device.type == "cpu" for r in built)
    assert routes.localmamba(3, 7, ("h", "w7_flip")).device.type == "cpu"


def test_builder_called_inside_compiled_code_runs():
    """A route builder called inside a compiled function runs eagerly (graph break), same result."""

    def f(x):
        return x.reshape(-1)[routes.cross2d(3, 4)[1]] * 2

    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(x), f(x))


def test_to_device_cache_follows_edits_and_frees_dropped_routes():
    """to_device's cache is keyed by the route's version (an in-place edit gives a new copy, not the
    stale one) and holds the route weakly (a dropped route frees its cached copy). The meta device
    stands in for a GPU: the cache logic is the same."""
    import gc
    import weakref

    r = routes.stack(routes.raster(3, 4)).clone()
    m1 = routes.to_device(r, "meta")
    assert routes.to_device(r, "meta") is m1  # cached
    r[0, 0] = -1
    m2 = routes.to_device(r, "meta")
    assert m2 is not m1
    ref = weakref.ref(r)
    n = len(routes._DEVICE_CACHE)
    del r
    gc.collect()
    assert ref() is None and len(routes._DEVICE_CACHE) < n


def test_cached_builders_do_not_hand_out_another_callers_edits():
    """Builders cache their routes (the same object while unedited, so the scan's per-route caches hit),
    but a route a caller edited in place is rebuilt for the next caller, and the encoders' routes
    (routes.built_route) are private copies: editing routes.cross2d(4, 4) changed every VMamba's
    output before (found by an exploratory run)."""
    from mamba_dense.encoders.vim import vim_route

    for build in (lambda: routes.cross2d(4, 4), lambda: routes.localmamba(4, 6, ("h", "w2_flip")),
                  lambda: vim_route(6, True, 2)):
        r = build()
        assert build() is r  # cached while unedited
        pristine = r.clone()
        r[:, 0] = -1  # a caller's own experiment
        fresh = build()
        assert fresh is not r and torch.equal(fresh, pristine)
    key = routes.source_key(routes.cross2d)
    built = routes.built_route(key, 5, 3)
    assert built.data_ptr() != routes.cross2d(5, 3).data_ptr()
    assert torch.equal(built, routes.cross2d(5, 3))


def test_builders_take_lists_and_numpy_ints():
    import numpy as np

    assert torch.equal(routes.localmamba(3, 4, ["h", "v_flip"]), routes.localmamba(3, 4, ("h", "v_flip")))
    assert torch.equal(routes.cross2d(np.int64(3), np.int32(4)), routes.cross2d(3, 4))
    with pytest.raises(ValueError, match="positive ints"):
        routes.cross2d(True, 4)


def test_vim_route_under_a_meta_default_device():
    from mamba_dense.encoders.vim import vim_route

    vim_route.cache_clear()  # built first under the meta device
    with torch.device("meta"):
        r = vim_route(5, True, 1)
    assert r.device.type == "cpu"
    vim_route.cache_clear()
    assert torch.equal(r, vim_route(5, True, 1))


def test_inverse_rejects_tokens_past_num_tokens():
    with pytest.raises(ValueError, match=r"\[-1, L\) with L = 4 tokens, got values in \[0, 5\]"):
        routes.inverse(routes.raster(6), 4)
    # it kept one of two visits and read -2 as a token (found by an exploratory run)
    with pytest.raises(ValueError, match="at most once"):
        routes.inverse(torch.tensor([[0, 1, 1]]), 3)
    with pytest.raises(ValueError, match=r"got values in \[-2, 1\]"):
        routes.inverse(torch.tensor([[0, -2, 1]]), 3)


def test_builder_cache_does_not_hand_out_routes_for_equal_arguments_of_other_types():
    """2.0 == 2 and True == 1 hash alike: after cross2d(2, 2) ran, cross2d(2.0, 2) got its route, unchecked."""
    routes.cross2d(2, 2)
    routes.cross2d(1, 1)
    for bad in ((2.0, 2), (True, True)):
        with pytest.raises(ValueError, match="positive ints"):
            routes.cross2d(*bad)
    with pytest.raises(ValueError, match="non-empty sequence of LocalMamba directions"):
        routes.localmamba(4, 4, ())


def test_registers_placement_and_checks():
    r = routes.raster(196)
    even = routes.with_registers(r, 196, 12).tolist()
    official = routes.with_registers(r, 196, 12, placement="mambar").tolist()
    group = 196 // 13  # Mamba(R)'s get_cls_idx: 15 tokens, a register, 15 tokens, ...
    assert [official.index(196 + i) for i in range(12)] == [(i + 1) * group + i for i in range(12)]
    assert [even.index(196 + i) for i in range(12)] == [round((i + 1) * 196 / 13) + i for i in range(12)]
    with pytest.raises(ValueError, match="num_tokens=2"):  # registers 2, 3 would repeat route tokens
        routes.with_registers(routes.raster(4), 2, 2)
    with pytest.raises(ValueError, match="num_registers must be an int"):
        routes.with_registers(r, 196, 2.0)
    with pytest.raises(ValueError, match="placement"):
        routes.with_registers(r, 196, 2, placement="middle")
