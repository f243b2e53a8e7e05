"""The Triton kernels themselves, forward and backward, against the fp64 reference.

On a CPU-only machine (CI) they run through Triton's interpreter (TRITON_INTERPRET=1, set in
tests/conftest.py) on tiny shapes; on a GPU the same tests run compiled. Outputs are poisoned with
NaN so an element the kernels forget to write fails the comparison.
"""

import os

import pytest
import torch

from mamba_dense.kernels import routes, selective_scan, selective_scan_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)"
)


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _inputs(batch, L, K, Dm, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc)  # noqa: E731
    args = [t(batch, L, Dm), t(batch, L, K, Dm, sc=0.7), -torch.exp(t(K, Dm, N, sc=0.5)),
            t(batch, L, K, N), t(batch, L, K, N), t(K, Dm), t(K, Dm, sc=0.3)]
    return [a.to(DEVICE, dtype) for a in args]


CASES = [
    # id, route builder, L, Dm, N, merge, merge strategy, tiles per chunk (None = automatic)
    ("cross2d-sum-buffer", lambda: routes.cross2d(5, 7), 35, 20, 3, "sum", "buffer", None),
    ("window-none-chunked", lambda: routes.localmamba(5, 6, ("h_flip", "w2", "v", "w7_flip")), 30, 9, 1, "none", "buffer", 1),
    ("window-sum-serial-chunked", lambda: routes.localmamba(4, 7, ("w2_flip", "h", "w7", "v_flip")), 28, 9, 4, "sum", "serial", 2),
    ("segmamba3d-sum", lambda: routes.segmamba3d(3, 4, 3), 36, 8, 4, "sum", "buffer", 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_match_reference(case, monkeypatch):
    """Forward and backward (a_{s+1} from each tile's own decays, carried across tiles and chunks;
    the carried state / gradient entered into each tile's first / last step), chunked and not, both
    merge strategies."""
    from mamba_dense.kernels import triton_scan as ts

    _, rb, L, Dm, N, merge, strategy, tpc = case
    monkeypatch.setenv("MAMBA_DENSE_MERGE", strategy)
    route = rb().to(DEVICE)
    K = route.shape[0]
    args = _inputs(2, L, K, Dm, N, torch.float64, seed=hash(case[0]) % 1000)
    leaves = [a.clone().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*leaves, route=route, merge=merge)
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, leaves, dy)

    y, states = ts.scan_fwd(*args, route, merge, True, torch.float64, True, tiles_per_chunk=tpc)
    grads = ts.scan_bwd(dy, *args, route, states, merge, True, tiles_per_chunk=tpc)
    assert torch.isfinite(y).all()
    assert _rel(y, y_ref) < 1e-10
    for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), grads, g_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-10, name


def _check_fp32_api(route, args, tol=1e-4):
    """selective_scan and its 7 gradients on fp32 inputs against the fp64 reference."""
    leaves = [a.clone().requires_grad_() for a in args]
    y = selective_scan(*leaves, route=route)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [a.double().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*ref_leaves, route=route)
    g_ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert y.dtype == torch.float32
    assert _rel(y, y_ref) < tol
    for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), g, g_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < tol, name


def test_fp32_inputs_public_api_autograd():
    _check_fp32_api(routes.cross2d(3, 6).to(DEVICE), _inputs(1, 18, 4, 12, 2, torch.float32, seed=3))


def test_wide_block_policy_and_chunked_result(monkeypatch):
    """N=1 forwards and backwards that run chunk-parallel take channel blocks of 32 when Dm is a
    multiple of 32; one-pass launches, other N, fp64, Dm not a multiple of 32 and a
    MAMBA_DENSE_SCAN_CFG override keep 16. Such a chunked fp32 forward and backward (channel blocks
    of 32, chunk carries) match the fp64 reference."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.delenv("MAMBA_DENSE_SCAN_CFG", raising=False)
    assert ts._wide_block(1, 96, torch.bfloat16, True)
    assert not ts._wide_block(1, 96, torch.bfloat16, False)
    assert not ts._wide_block(16, 96, torch.bfloat16, True)
    assert not ts._wide_block(1, 48, torch.bfloat16, True)
    assert not ts._wide_block(1, 96, torch.float64, True)
    monkeypatch.setenv("MAMBA_DENSE_SCAN_CFG", "32,16,16,1")
    assert not ts._wide_block(1, 96, torch.bfloat16, True)
    monkeypatch.delenv("MAMBA_DENSE_SCAN_CFG")

    monkeypatch.setattr(ts, "_num_sms", lambda dev: 64)  # pretend a large GPU: the launch goes chunk-parallel
    seen = []

    class _Spy:  # records the channel block of every launch
        def __init__(self, real, kind):
            self.real, self.kind = real, kind

        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append((self.kind, kw["BD"], kw["PHASE"], grid[1]))
                return self.real[grid](*a, **kw)
            return launch

    monkeypatch.setattr(ts, "_fwd_kernel", _Spy(ts._fwd_kernel, "fwd"))
    monkeypatch.setattr(ts, "_bwd_kernel", _Spy(ts._bwd_kernel, "bwd"))
    _check_fp32_api(routes.cross2d(8, 16).to(DEVICE), _inputs(1, 128, 4, 32, 1, torch.float32, seed=41))
    assert seen and all(bd == 32 for _, bd, _, _ in seen), seen
    for kind in ("fwd", "bwd"):
        assert any(k == kind and phase == 1 and chunks > 1 for k, _, phase, chunks in seen), seen


@pytest.mark.parametrize("tpc", [None, 1], ids=["one-pass", "chunks-of-1-tile"])
def test_forward_tiles_longer_than_backward_tiles(tpc, monkeypatch):
    """N=1 in fp32: the forward walks 32-step tiles and saves the state every 16 steps (two per tile)
    for the backward's 16-step tiles. With S = 72 the last forward tile holds one saved state only
    (5 slots). The saved states (poisoned buffers) equal those of a forward on 16-step tiles, one
    pass or chunk-parallel (the carry then strides over 2 slots per tile), and the result and
    gradients match the fp64 reference."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.delenv("MAMBA_DENSE_SCAN_CFG", raising=False)
    cfg = ts._config(1, 16, torch.float32)
    assert (cfg.Tf, cfg.T) == (32, 16)
    assert ts._config(1, 16, torch.float64).Tf == ts._config(1, 16, torch.float64).T
    assert ts._config(16, 16, torch.float32).Tf == ts._config(16, 16, torch.float32).T
    route = routes.bidirectional(72).to(DEVICE)
    args = _inputs(2, 72, 2, 16, 1, torch.float32, seed=43)
    y, st = ts.scan_fwd(*args, route, "sum", True, torch.float32, True, tiles_per_chunk=tpc)
    assert st.shape == (2, 2, 5, 1, 16)
    monkeypatch.setenv("MAMBA_DENSE_SCAN_CFG", "16,16,16,16,1")
    y16, st16 = ts.scan_fwd(*args, route, "sum", True, torch.float32, True, tiles_per_chunk=tpc)
    assert torch.isfinite(st).all()
    torch.testing.assert_close(st, st16, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y16, rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("MAMBA_DENSE_SCAN_CFG")
    dy = torch.randn_like(y)
    grads = ts.scan_bwd(dy, *args, route, st, "sum", True, tiles_per_chunk=tpc)
    ref = [a.double().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*ref, route=route)
    g_ref = torch.autograd.grad(y_ref, ref, dy.double())
    assert _rel(y, y_ref) < 1e-5
    for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), grads, g_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-5, name
    monkeypatch.setenv("MAMBA_DENSE_SCAN_CFG", "32,24,16,16,1")
    with pytest.raises(ValueError, match="multiple of the backward tile"):
        ts._config(1, 16, torch.float32)


@pytest.mark.parametrize("N,tpc", [(1, None), (1, 1), (3, None)], ids=["n1-one-pass", "n1-chunked", "n3-one-pass"])
def test_forward_prefetch_same_result(N, tpc, monkeypatch):
    """The forward that gathers its next tile ahead (PREFETCH, the default for one-pass N=1 launches)
    gives the same outputs and saved states as the plain loop, one pass and chunk-parallel (phases 1
    and 3), on a route with padding steps (LocalMamba windows) and a ragged last tile."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.delenv("MAMBA_DENSE_FWD_PREFETCH", raising=False)
    assert ts._fwd_prefetch(1, False) and not ts._fwd_prefetch(1, True) and not ts._fwd_prefetch(16, False)
    assert not ts._fwd_prefetch(1, True, phase=1) and not ts._fwd_prefetch(1, False, phase=1)
    monkeypatch.setenv("MAMBA_DENSE_FWD_PREFETCH", "1,0")  # per phase: phase 1, output pass
    assert ts._fwd_prefetch(16, True, phase=1) and not ts._fwd_prefetch(1, False, phase=0)
    route = routes.localmamba(5, 7, ("w2", "v_flip")).to(DEVICE)
    K, L = route.shape[0], 35
    args = _inputs(2, L, K, 20, N, torch.float32, seed=53)
    out = {}
    for pf in ("0", "1", "1,0", "0,1"):
        monkeypatch.setenv("MAMBA_DENSE_FWD_PREFETCH", pf)
        out[pf] = ts.scan_fwd(*args, route, "sum", True, torch.float32, True, tiles_per_chunk=tpc)
    for pf in ("1", "1,0", "0,1"):
        for a, b in zip(out[pf], out["0"]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ref = [a.double() for a in args]
    assert _rel(out["1"][0], selective_scan_ref(*ref, route=route)) < 1e-5


def test_n16_backward_register_cap_and_chunked_gradients(monkeypatch):
    """The N=16 backward tile is launched with a register cap (more programs per SM, H100 sweep);
    other tiles are not, and MAMBA_DENSE_SCAN_MAXNREG overrides. A chunk-parallel N=16 backward
    launched with the cap still matches the fp64 reference (the cap changes no arithmetic)."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.delenv("MAMBA_DENSE_SCAN_MAXNREG", raising=False)
    assert ts._reg_cap("bwd", 16, 8, 8, 1) == {"maxnreg": 168}  # the gradient pass
    assert ts._reg_cap("bwd", 16, 8, 8, 1, phase=1) == {}  # its chunk-end pass runs uncapped
    assert ts._reg_cap("bwd", 1, 32, 16, 1) == {}
    assert ts._reg_cap("bwd", 16, 16, 16, 4) == {}  # fp64 tile
    assert ts._reg_cap("fwd", 16, 8, 16, 1) == {"maxnreg": 128}
    assert ts._reg_cap("fwd", 16, 8, 16, 1, phase=1) == {"maxnreg": 96}
    assert ts._reg_cap("fwd", 1, 32, 16, 1, prefetch=True) == {"maxnreg": 112}  # one-pass N=1
    # the chunked N=1 forward, channel blocks of 32 and 16: output pass 152, phase 1 96
    for bd in (32, 16):
        assert ts._reg_cap("fwd", 1, 32, bd, 1) == {"maxnreg": 152}
        assert ts._reg_cap("fwd", 1, 32, bd, 1, phase=1) == {"maxnreg": 96}
    assert ts._reg_cap("fwd", 1, 32, 64, 1) == {} and ts._reg_cap("fwd", 1, 16, 32, 1, phase=1) == {}
    monkeypatch.setenv("MAMBA_DENSE_SCAN_MAXNREG", "0,200")
    assert ts._reg_cap("bwd", 16, 8, 8, 1) == {"maxnreg": 200} and ts._reg_cap("fwd", 16, 8, 16, 1) == {}
    monkeypatch.setenv("MAMBA_DENSE_SCAN_MAXNREG", "96,0,144,0")  # per phase: fwd1, fwd0, bwd1, bwd0
    assert ts._reg_cap("fwd", 16, 8, 16, 1, phase=1) == {"maxnreg": 96} and ts._reg_cap("fwd", 16, 8, 16, 1) == {}
    assert ts._reg_cap("bwd", 16, 8, 8, 1, phase=1) == {"maxnreg": 144} and ts._reg_cap("bwd", 16, 8, 8, 1) == {}
    monkeypatch.delenv("MAMBA_DENSE_SCAN_MAXNREG")
    monkeypatch.setattr(ts, "_num_sms", lambda dev: 64)  # pretend a large GPU: the launch goes chunk-parallel
    route = routes.segmamba3d(2, 4, 5).to(DEVICE)  # 40 steps = 5 tiles of 8
    assert ts._tiles_per_chunk(5, 1 * 3 * 2, 64) < 5
    # the backward's chunks: at least BWD_MIN_TILES_PER_CHUNK tiles, or half the route
    assert ts._tiles_per_chunk(4096, 12, 132) == 3 and ts._tiles_per_chunk(4096, 12, 132, None, 6) == 6
    assert ts._tiles_per_chunk(8, 4, 64, None, 6) == 4 and ts._tiles_per_chunk(5, 6, 64, None, 6) == 2
    assert ts._tiles_per_chunk(16384, 18, 132, None, 6) == ts._tiles_per_chunk(16384, 18, 132) == 18
    # 12 channels: two blocks of 8, the second masked
    _check_fp32_api(route, _inputs(1, 40, 3, 12, 16, torch.float32, seed=13))


def test_pair_merge_chunking_policy(monkeypatch):
    """Calls whose chunks would merge their routes by reversed pairs split into chunks below
    PAIR_MIN_PROGRAMS_PER_SM programs per SM when their routes have PAIR_MIN_STEPS steps or more (the
    pairs then replace the per-route buffer and its sum); other calls keep MIN_PROGRAMS_PER_SM."""
    from mamba_dense.kernels import triton_scan as ts

    assert ts._min_programs(True, ts.PAIR_MIN_STEPS) == ts.PAIR_MIN_PROGRAMS_PER_SM > ts.MIN_PROGRAMS_PER_SM
    assert ts._min_programs(True, ts.PAIR_MIN_STEPS - 1) == ts._min_programs(False, 10**6) == ts.MIN_PROGRAMS_PER_SM
    # S1's launch (b64, 6 blocks of 16 channels, 4 routes = 1536 programs) on 132 SMs
    assert ts._tiles_per_chunk(98, 1536, 132) == 98
    assert ts._tiles_per_chunk(98, 1536, 132, min_programs=ts.PAIR_MIN_PROGRAMS_PER_SM) < 98
    monkeypatch.setattr(ts, "_num_sms", lambda dev: 132)

    def plans(h, w, batch, N=1, merge="sum", dtype=torch.bfloat16):
        route = routes.cross2d(h, w)
        L, K, Dm = h * w, route.shape[0], 96
        x = torch.empty(batch, L, Dm, dtype=dtype)
        A, B, C = torch.empty(K, Dm, N), torch.empty(batch, L, K, N, dtype=dtype), torch.empty(batch, L, K, N, dtype=dtype)
        cover = ts.route_coverage(route, L)
        f = ts._FwdPlan(x, A, route, cover, merge, None, True, None, True, False, False)
        b = ts._BwdPlan(x, A, B, C, route, cover, merge, True, None, False, False)
        return f, b

    f, b = plans(56, 56, 64)  # 3136 steps, 11.6 programs per SM: chunked, merged by pairs
    assert f.chunked and f.groups is not None and b.chunked and b.groups is not None
    assert ts._pairable(routes.cross2d(56, 56), "sum", False, (True,) * 4, 3136, 32, torch.bfloat16, 1)
    f, b = plans(28, 28, 32)  # 784 steps: one pass, as before
    assert not f.chunked and not b.chunked
    f, b = plans(56, 56, 64, N=16)  # no pair merge for N = 16: one pass, as before
    assert not f.chunked and not b.chunked
    f, b = plans(56, 56, 64, merge="none")
    assert not f.chunked and not b.chunked
    f, b = plans(56, 56, 320)  # 58 programs per SM: enough without chunks
    assert not f.chunked and not b.chunked


def test_bf16_gradients_from_bf16_channel_block_partials():
    """bf16 B and C: the backward's per-channel-block dB / dC partials are stored in bf16 and summed in
    fp32 (fp32 / fp16 / fp64 gradients keep fp32 / fp64 partials); with three channel blocks (N=16:
    8 channels per block, the last masked) the bf16 gradients stay within bf16 tolerance of fp64."""
    from mamba_dense.kernels import triton_scan as ts

    assert ts._partial_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert ts._partial_dtype(torch.float16, torch.float32) == torch.float32
    assert ts._partial_dtype(torch.float32, torch.float32) == torch.float32
    assert ts._partial_dtype(torch.float64, torch.float64) == torch.float64
    route = routes.segmamba3d(2, 3, 4).to(DEVICE)
    args = _inputs(2, 24, 3, 20, 16, torch.float64, seed=21)
    args[0] = args[0][:, :, None, :].expand(-1, -1, 3, -1).contiguous()  # x per route, as RouteMamba calls it
    low = [a.to(torch.bfloat16) if i in (0, 1, 3, 4) else a.float() for i, a in enumerate(args)]
    leaves = [a.clone().requires_grad_() for a in low]
    y = selective_scan(*leaves, route=route, merge="none")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, y.dtype)
    g = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [a.double().requires_grad_() for a in low]
    g_ref = torch.autograd.grad(selective_scan_ref(*ref_leaves, route=route, merge="none"), ref_leaves, dy.double())
    for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), g, g_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 2e-2, name
    assert g[3].dtype == g[4].dtype == torch.bfloat16


@pytest.mark.parametrize("n_blk,M,dtype,out", [(1, 37, torch.float32, torch.bfloat16), (5, 2049 + 7, torch.bfloat16, torch.bfloat16),
                                               (3, 100, torch.float32, torch.float32), (4, 50, torch.float64, torch.float64)])
def test_sum_blocks_adds_the_partials(n_blk, M, dtype, out):
    """sum_blocks: the channel blocks' partials added in one pass (one program's tail masked), in the
    output dtype; no element left unwritten (outputs are poisoned)."""
    from mamba_dense.kernels import triton_scan as ts

    part = (torch.randn(n_blk, M, generator=torch.Generator().manual_seed(n_blk), dtype=torch.float64) + 0.5)
    part = part.to(DEVICE, dtype)
    got = ts.sum_blocks(part.view(n_blk, 1, M), out)
    assert got.shape == (1, M) and got.dtype == out
    want = part.double().sum(0).to(out).double()
    assert _rel(got[0], want) < (1e-2 if out == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("n_blk,M,dtype,out,dtype2", [(5, 2049 + 7, torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                                      (3, 100, torch.float32, torch.float32, torch.float32),
                                                      (3, 100, torch.float32, torch.float32, torch.bfloat16)])
def test_sum_blocks2_adds_both_partials(n_blk, M, dtype, out, dtype2):
    """sum_blocks2 (the backward's dB and dC sums in one launch): each output is its own partial's sum,
    in its own tensor; partials of different dtypes take two sum_blocks launches instead."""
    from mamba_dense.kernels import triton_scan as ts

    gen = torch.Generator().manual_seed(M)
    p1 = (torch.randn(n_blk, 1, M, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE, dtype)
    p2 = (torch.randn(n_blk, 1, M, generator=gen, dtype=torch.float64) - 0.5).to(DEVICE, dtype2)
    a, b = ts.sum_blocks2(p1, out, p2, out)
    assert a.shape == b.shape == (1, M) and a.dtype == b.dtype == out
    assert a.data_ptr() != b.data_ptr() and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    tol = 1e-2 if torch.bfloat16 in (out, dtype, dtype2) else 1e-6
    assert _rel(a[0], p1.double().sum(0)[0].to(out).double()) < tol
    assert _rel(b[0], p2.double().sum(0)[0].to(out).double()) < tol


@pytest.mark.parametrize("R,K,N,Dm,has_d,has_bias", [(1, 1, 1, 3, True, True), (3, 2, 4, 37, True, False),
                                                   (600, 3, 1, 5, False, True), (5, 2, 16, 8, False, False),
                                                   (2100, 1, 1, 3, True, True)])  # several unrolled rounds
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_params_adds_every_row(R, K, N, Dm, has_d, has_bias, dtype):
    """sum_params (the backward's dA / dD / dbias partials over batch x chunks): row blocks of up to
    256, four at a time, with a masked tail (600 rows: 3 blocks; 2100: 9 blocks in 3 rounds) and masked
    columns; dA written transposed to (K, D, N), dD / dbias to (K, D), each in its own dtype, every
    element written (poisoned buffers)."""
    from mamba_dense.kernels import triton_scan as ts

    p = torch.randn(R, K * (N + 2) * Dm, generator=torch.Generator().manual_seed(R), dtype=torch.float64) + 0.25
    col = p.sum(0).view(K, N + 2, Dm)
    os.environ["MAMBA_DENSE_POISON"] = "1"
    try:
        dA, dD, dbias = ts.sum_params(p.to(DEVICE, dtype), K, N, Dm, dtype,
                                      torch.bfloat16 if has_d else None, dtype if has_bias else None)
    finally:
        os.environ.pop("MAMBA_DENSE_POISON")
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert dA.shape == (K, Dm, N) and dA.dtype == dtype and dA.is_contiguous()
    assert _rel(dA.cpu(), col[:, :N].transpose(1, 2)) < tol
    if has_d:
        assert dD.shape == (K, Dm) and dD.dtype == torch.bfloat16
        assert _rel(dD.cpu(), col[:, N]) < 1e-2
    else:
        assert dD is None
    if has_bias:
        assert dbias.shape == (K, Dm) and dbias.dtype == dtype and _rel(dbias.cpu(), col[:, N + 1]) < tol
    else:
        assert dbias is None
    with pytest.raises(ValueError, match="columns"):
        ts.sum_params(p.to(DEVICE, dtype), K + 1, N, Dm, dtype)


def test_fast_exp_policy(monkeypatch):
    """The ex2.approx.ftz decays: fp32 state on a GPU only; MAMBA_DENSE_SCAN_FAST_EXP=0 turns them off."""
    from types import SimpleNamespace

    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.delenv("MAMBA_DENSE_SCAN_FAST_EXP", raising=False)
    gpu_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert ts._fast_exp(gpu_bf16) and ts._fast_exp(SimpleNamespace(is_cuda=True, dtype=torch.float32))
    assert not ts._fast_exp(SimpleNamespace(is_cuda=True, dtype=torch.float64))
    assert not ts._fast_exp(torch.zeros(1))  # CPU tensors: the interpreter has no inline PTX
    monkeypatch.setenv("MAMBA_DENSE_SCAN_FAST_EXP", "0")
    assert not ts._fast_exp(gpu_bf16)


@pytest.mark.skipif(DEVICE == "cpu", reason="inline PTX (ex2.approx.ftz) runs on a GPU only; the interpreter takes tl.exp")
@pytest.mark.parametrize("fast", ["0", "1"], ids=["tl.exp", "ex2.ftz"])
@pytest.mark.parametrize("N", [1, 16])
def test_fast_exp_decays_match_reference(N, fast, monkeypatch):
    """fp32 forward and gradients with the decays through ex2.approx.ftz (the default) or tl.exp,
    against fp64, including steps whose decay underflows (delta * A < -126 ln 2: the
    flushed-to-zero decay must still give exact zeros in the backward's a_s h_{s-1})."""
    monkeypatch.setenv("MAMBA_DENSE_SCAN_FAST_EXP", fast)
    args = _inputs(1, 40, 3, 12, N, torch.float32, seed=17 + N)
    args[1][0, :5] = 6.0  # softplus(6 + bias) ~ 6: with A ~ -exp(N(0, 0.5)) some decays reach e^-100
    args[2][0, :3] = -40.0
    _check_fp32_api(routes.segmamba3d(2, 4, 5).to(DEVICE), args)


def test_fast_softplus_polynomial_error():
    """The polynomial of _softplus_fast (whose inline PTX runs on a GPU only): s p(s^2) against
    log1p(y) = 2 atanh(s), s = y / (2 + y), in fp64 over y in (0, 1]: relative error below 2.5e-7 (the
    fitted minimax error of the degree-3 polynomial is 1.9e-7, about three fp32 roundings)."""
    from mamba_dense.kernels import triton_scan as ts

    y = torch.cat([torch.logspace(-30, 0, 20001, dtype=torch.float64),
                   torch.linspace(1e-6, 1, 200001, dtype=torch.float64)])
    s = y / (2 + y)
    z = s * s
    p = torch.zeros_like(z)
    for c in (ts._SP3, ts._SP2, ts._SP1, ts._SP0):
        p = p * z + float(getattr(c, "value", c))
    rel = ((s * p - torch.log1p(y)) / torch.log1p(y)).abs()
    assert rel.max().item() < 2.5e-7, rel.max().item()
    assert rel.max().item() > 1e-8  # a real approximation, not the series itself
    assert rel[y < 1e-3].max().item() < 1e-9  # exact in the limit: p(0) = 2, so small y keep their digits


@pytest.mark.skipif(DEVICE == "cpu", reason="inline PTX (ex2 / rcp .approx.ftz) runs on a GPU only")
def test_fast_softplus_and_sigmoid_match_fp64():
    """_softplus_fast / _sigmoid_fast (the fp32 GPU path of the scan kernels) against fp64 torch over
    [-120, 120] and magnitudes from 1e-8 to 1e4, both signs: relative error below 1e-5 wherever the
    true value is a normal fp32 number (exp(-|v|) flushes to 0 past |v| = 87, as documented), and
    the exact limits: softplus(v) = v and sigmoid = 1 for large v, 0 for large negative v; and
    _softplus_sigmoid_fast gives the same two values."""
    import triton
    import triton.language as tl

    from mamba_dense.kernels import triton_scan as ts

    @triton.jit
    def _k(v_ptr, sp_ptr, sg_ptr, sp2_ptr, sg2_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        v = tl.load(v_ptr + i, mask=m, other=0.0)
        tl.store(sp_ptr + i, ts._softplus_fast(v), mask=m)
        tl.store(sg_ptr + i, ts._sigmoid_fast(v), mask=m)
        sp2, sg2 = ts._softplus_sigmoid_fast(v)  # the backward's pair, from one exp: the same values
        tl.store(sp2_ptr + i, sp2, mask=m)
        tl.store(sg2_ptr + i, sg2, mask=m)

    mags = torch.logspace(-8, 4, 20001, dtype=torch.float64)
    v = torch.cat([torch.linspace(-120, 120, 480001, dtype=torch.float64), mags, -mags]).float().to(DEVICE)
    sp = torch.full_like(v, float("nan"))
    sg = torch.full_like(v, float("nan"))
    sp2 = torch.full_like(v, float("nan"))
    sg2 = torch.full_like(v, float("nan"))
    _k[(triton.cdiv(v.numel(), 1024),)](v, sp, sg, sp2, sg2, v.numel(), BLOCK=1024)
    assert torch.equal(sp2, sp) and torch.equal(sg2, sg)
    vd = v.double()
    for got, want in ((sp, torch.nn.functional.softplus(vd)), (sg, torch.sigmoid(vd))):
        got = got.double()
        assert torch.isfinite(got).all()
        normal = want > 2.0**-125
        rel = ((got - want).abs() / want)[normal]
        assert rel.max().item() < 1e-5, (rel.max().item(), vd[normal][rel.argmax()].item())
        assert (got[~normal] <= 2.0**-125).all()  # flushed or tiny, never wrong in sign or size
    big = vd > 90
    assert torch.equal(sp.double()[big], vd[big]) and (sg[big] == 1).all()
    assert (sp[vd < -90] == 0).all() and (sg[vd < -90] == 0).all()


@pytest.mark.parametrize("cb", [None, "32"], ids=["one_round", "cb32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunk_carry_matches_a_sequential_loop(reverse, dtype, cb, monkeypatch):
    """The carry between chunks equals the plain recurrence h <- exp(A * dsum_c) h + own_c,
    written to every chunk's slot in place, for 70 chunks, strided slots (the forward's one slot
    per chunk's first tile), and leaves every other slot untouched: all chunks in one round (the
    default, CB 128) and 32 chunks per round (two full rounds and a partial one)."""
    from mamba_dense.kernels import triton_scan as ts

    if cb is None:
        monkeypatch.delenv("MAMBA_DENSE_CARRY_CB", raising=False)
        assert ts._carry_cfg(70, 6)[0] == 128
        # few state columns: up to 1024 chunks a round in blocks down to 4; many: 512, blocks down to 8
        assert ts._carry_cfg(1024, 96, 4) == (1024, 4, 8) and ts._carry_cfg(2048, 48, 6) == (1024, 4, 8)
        assert ts._carry_cfg(256, 96, 64) == (256, 8, 4) and ts._carry_cfg(2048, 768, 6) == (512, 8, 8)
    else:
        monkeypatch.setenv("MAMBA_DENSE_CARRY_CB", cb)

    g = torch.Generator().manual_seed(21 + reverse)
    batch, K, N, Dm, n_chunks = 1, 2, 2, 3, 70
    stride = 1 if reverse else 3
    n_slots = (n_chunks - 1) * stride + 2  # one slot past the last chunk's, never a chunk slot
    buf = torch.randn(batch * K, n_slots, N, Dm, generator=g, dtype=torch.float64)
    dsum = torch.rand(batch * K, n_slots, Dm, generator=g, dtype=torch.float64)
    A = -torch.exp(torch.randn(K, Dm, N, generator=g, dtype=torch.float64) * 0.5)
    want = buf.clone()
    for r in range(batch * K):
        h = torch.zeros(N, Dm, dtype=torch.float64)
        order = range(n_chunks - 1, -1, -1) if reverse else range(n_chunks)
        for c in order:
            slot = c * stride
            own = buf[r, slot].clone()
            want[r, slot] = h
            h = torch.exp(A[r % K].T * dsum[r, slot]) * h + own
    got = buf.to(DEVICE, dtype)
    ts.carry(got, dsum.to(DEVICE, dtype), A.to(DEVICE, dtype), n_chunks, stride, n_slots, Dm, N, K, reverse, batch * K)
    got = got.cpu()
    assert _rel(got, want) < (1e-12 if dtype == torch.float64 else 1e-6)
    chunk_slots = torch.arange(n_chunks) * stride
    other = torch.ones(n_slots, dtype=torch.bool)
    other[chunk_slots] = False
    assert torch.equal(got[:, other].double(), buf[:, other].to(dtype).double())


def test_bf16_inputs_fp32_output():
    route = routes.bidirectional(24).to(DEVICE)
    args = _inputs(2, 24, 2, 8, 1, torch.float32, seed=5)
    args[0], args[1], args[3], args[4] = (a.to(torch.bfloat16) for a in (args[0], args[1], args[3], args[4]))
    y16 = selective_scan(*args, route=route)
    y32 = selective_scan(*args, route=route, out_dtype=torch.float32)
    ref = selective_scan_ref(*[a.double() for a in args], route=route)
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert _rel(y16, ref) < 2e-2
    assert _rel(y32, ref) < 1e-5  # fp32 state from bf16-rounded inputs: only the output rounding differs


@pytest.mark.parametrize("path", ["function", "op"])
def test_gradcheck_through_registered_op(path, monkeypatch):
    """gradcheck of all seven inputs through the eager fast path (_EagerScan) and through the
    registered ops: the whole Jacobian for the ops (about 25 s under the interpreter), gradcheck's
    fast mode (random projections of it) for the fast path, which runs the same kernels."""
    monkeypatch.setenv("MAMBA_DENSE_SCAN_EAGER", path)
    route = torch.tensor([[0, 2, -1, 1], [1, -1, 0, 2]], device=DEVICE)
    args = [a.requires_grad_() for a in _inputs(1, 3, 2, 2, 2, torch.float64, seed=7)]
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan(*a, route=route), args, fast_mode=(path == "function"), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("merge", ["sum", "none"])
def test_eager_function_and_registered_op_agree(merge, monkeypatch):
    """Eager calls take the autograd.Function fast path; MAMBA_DENSE_SCAN_EAGER=op takes the
    registered ops. Both run the same kernels: outputs and all seven gradients bit for bit equal,
    chunked (one tile per chunk) and with a padded route."""
    from mamba_dense.kernels import _op
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setattr(ts, "MIN_PROGRAMS_PER_SM", 64)  # chunk-parallel
    route = routes.localmamba(7, 9, ("h", "w2_flip")).to(DEVICE)
    leaves = _inputs(2, 63, 2, 6, 2, torch.float32, seed=23)
    out = {}
    for path in ("function", "op"):
        monkeypatch.setenv("MAMBA_DENSE_SCAN_EAGER", path)
        assert _op.use_eager_path(leaves[0]) == (path == "function")
        ins = [a.detach().clone().requires_grad_() for a in leaves]
        y = selective_scan(*ins, route=route, merge=merge)
        assert ("_EagerScan" in type(y.grad_fn).__name__) == (path == "function")
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        out[path] = (y.detach(), *torch.autograd.grad(y, ins, dy))
    for a, b in zip(out["function"], out["op"]):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        assert torch.equal(a, b)
    # no gradient at forward time: no graph (the forward runs without the autograd.Function), the same values
    with torch.no_grad():
        y = selective_scan(*leaves, route=route, merge=merge)
    assert y.grad_fn is None
    assert torch.equal(y, out["function"][0])


def test_torch_compile_no_graph_break():
    route = routes.cross2d(2, 3).to(DEVICE)
    args = [a.requires_grad_() for a in _inputs(1, 6, 4, 4, 1, torch.float64, seed=9)]

    def f(*a):
        return selective_scan(*a, route=route).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    g = torch.autograd.grad(out, args)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref = selective_scan_ref(*ref_args, route=route).square().sum()
    g_ref = torch.autograd.grad(ref, ref_args)
    assert abs(float(out) - float(ref)) < 1e-9 * abs(float(ref))
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 1e-10


def test_under_autocast_bf16_matches_reference_of_the_same_values():
    # under autocast a layer's projections hand the scan bf16 x, dt, B, C while A, D and dt_bias stay
    # fp32 parameters; the op is no autocast op: it takes the dtypes it is given (fp32 state), returns
    # x's dtype, and the parameters' gradients come back in fp32
    route = routes.cross2d(4, 5).to(DEVICE)
    g = torch.Generator().manual_seed(21)
    b, L, K, Dm, N, Cin = 2, 20, 4, 8, 2, 6
    feats = torch.randn(b, L, Cin, generator=g).to(DEVICE)
    proj = torch.nn.Linear(Cin, Dm + K * Dm + 2 * K * N).to(DEVICE)
    A = (-torch.exp(torch.randn(K, Dm, N, generator=g) * 0.5)).to(DEVICE).requires_grad_()
    Dp = torch.randn(K, Dm, generator=g).to(DEVICE).requires_grad_()
    bias = (torch.randn(K, Dm, generator=g) * 0.3).to(DEVICE).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        z = proj(feats)
        x = z[..., :Dm].contiguous()
        dt = z[..., Dm:Dm + K * Dm].reshape(b, L, K, Dm).contiguous()
        B = z[..., Dm + K * Dm:Dm + K * Dm + K * N].reshape(b, L, K, N).contiguous()
        C = z[..., Dm + K * Dm + K * N:].reshape(b, L, K, N).contiguous()
        assert x.dtype == dt.dtype == B.dtype == C.dtype == torch.bfloat16
        y = selective_scan(x, dt, A, B, C, Dp, bias, route=route)
    assert y.dtype == torch.bfloat16
    ref_in = [t.detach().double().requires_grad_() for t in (x, dt, A, B, C, Dp, bias)]
    y_ref = selective_scan_ref(*ref_in, route=route)
    assert _rel(y, y_ref) < 2e-2
    y.float().square().sum().backward()
    grads_ref = torch.autograd.grad(y_ref.square().sum(), ref_in)
    for name, p, ref in (("A", A, grads_ref[2]), ("D", Dp, grads_ref[5]), ("dt_bias", bias, grads_ref[6])):
        assert p.grad.dtype == torch.float32, name
        assert _rel(p.grad, ref) < 2e-2, name
    assert proj.weight.grad.dtype == torch.float32 and torch.isfinite(proj.weight.grad).all()


def test_per_route_x_matches_reference(monkeypatch):
    from mamba_dense.kernels import triton_scan as ts

    route = routes.localmamba(3, 5, ("h", "v_flip", "w2")).to(DEVICE)
    K = route.shape[0]
    args = _inputs(2, 15, K, 6, 2, torch.float64, seed=11)
    g = torch.Generator().manual_seed(12)
    args[0] = torch.randn(2, 15, K, 6, generator=g, dtype=torch.float64).to(DEVICE)  # one x per route
    leaves = [a.clone().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*leaves, route=route)
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, leaves, dy)
    y, states = ts.scan_fwd(*args, route, "sum", True, torch.float64, True, tiles_per_chunk=1)
    grads = ts.scan_bwd(dy, *args, route, states, "sum", True, tiles_per_chunk=1)
    assert _rel(y, y_ref) < 1e-10
    assert grads[0].shape == args[0].shape
    for a, b in zip(grads, g_ref):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("strategy", ["buffer", "serial"])
def test_unknown_coverage_path_matches_reference(strategy, monkeypatch):
    """Under CUDA-graph capture the scan cannot sync to learn a route's coverage and takes the
    zero-filled path for every route; on covering routes that path must give the same results."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setenv("MAMBA_DENSE_MERGE", strategy)
    monkeypatch.setattr(ts, "route_coverage", lambda route, L: (False,) * route.shape[0])
    route = routes.cross2d(4, 6).to(DEVICE)
    args = _inputs(2, 24, 4, 10, 2, torch.float64, seed=7)
    leaves = [a.clone().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*leaves, route=route, merge="sum")
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, leaves, dy)
    y, states = ts.scan_fwd(*args, route, "sum", True, torch.float64, True)
    grads = ts.scan_bwd(dy, *args, route, states, "sum", True)
    assert _rel(y, y_ref) < 1e-10
    for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), grads, g_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-10, name


def test_route_groups_pair_reversed_routes():
    """Merge groups: a route and its exact reverse form a pair, every other route stays alone."""
    from mamba_dense.kernels import triton_scan as ts

    assert ts.route_groups(routes.cross2d(3, 5).to(DEVICE)) == ((0, 2), (1, 3))
    assert ts.route_groups(routes.segmamba3d(2, 3, 4).to(DEVICE)) == ((0, 1), (2,))
    assert ts.route_groups(routes.bidirectional(7).to(DEVICE)) == ((0, 1),)
    assert ts.route_groups(routes.localmamba(5, 6, ("w2", "h", "w2_flip")).to(DEVICE)) == ((0, 2), (1,))
    assert ts.route_groups(torch.stack([routes.raster(3, 4), routes.column(3, 4)]).to(DEVICE)) == ((0,), (1,))
    # registers spliced at the same steps of both directions: no longer each other's reverse
    assert ts.route_groups(routes.with_registers(routes.bidirectional(9), 9, 2).to(DEVICE)) == ((0,), (1,))
    assert ts.route_groups(routes.raster(6)[None].to(DEVICE)) == ((0,),)


def test_group_order_single_routes_first():
    """The pair merge launches single routes first, then the pairs in route order (0) or reversed (1):
    the forward takes cross2d's row pair last (FWD_GROUP_ORDER)."""
    from mamba_dense.kernels import triton_scan as ts

    assert ts._group_order(((0, 2), (1, 3)), 0) == [(0, 2), (1, 3)]
    assert ts._group_order(((0, 2), (1, 3)), 1) == [(1, 3), (0, 2)]
    assert ts._group_order(((0, 1), (2,)), 0) == ts._group_order(((0, 1), (2,)), 1) == [(2,), (0, 1)]
    assert ts._group_order(((0, 2), (1,), (3, 4)), 1) == [(1,), (3, 4), (0, 2)]
    assert ts.FWD_GROUP_ORDER == 1 and ts.BWD_GROUP_ORDER == 0


def test_pair_tiles_divide_the_route():
    from mamba_dense.kernels import triton_scan as ts

    assert ts._pair_tiles(512, 3) == 4  # divisors of 512 within [2, 6]: 2, 4
    assert ts._pair_tiles(98, 5) == 7
    assert ts._pair_tiles(97, 5) is None  # prime: no chunking into mirrored pieces
    assert ts._pair_tiles(4, 2) == 2 and ts._pair_tiles(2, 1) == 1 and ts._pair_tiles(2, 2) == 1


def test_int32_token_rows_match_int64(monkeypatch):
    """The kernels read an int32 copy of the route when every row offset fits 31 bits (_kernel_route,
    cached per route) and the int64 route otherwise; both give bit-identical outputs and gradients
    (chunk-parallel forward and backward, pair merges included)."""
    from mamba_dense.kernels import triton_scan as ts

    route = routes.cross2d(8, 8).to(DEVICE)
    r32 = ts._kernel_route(route, 2 * 64 * 4 * 20)
    assert r32.dtype == torch.int32 and torch.equal(r32.long(), route)
    assert ts._kernel_route(route, 2 * 64 * 4 * 20) is r32  # cached
    assert ts._kernel_route(route, 2**31) is route  # offsets past 31 bits: int64
    monkeypatch.setenv("MAMBA_DENSE_SCAN_I64", "1")
    assert ts._kernel_route(route, 16) is route
    args = _inputs(2, 64, 4, 20, 1, torch.float32, seed=11)
    dy = torch.randn(2, 64, 20, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    out = {}
    for i64 in ("1", "0"):
        monkeypatch.setenv("MAMBA_DENSE_SCAN_I64", i64)
        y, st = ts.scan_fwd(*args, route, "sum", True, torch.float32, True, tiles_per_chunk=1)
        out[i64] = (y, *ts.scan_bwd(dy, *args, route, st, "sum", True, tiles_per_chunk=1))
    for a, b in zip(out["1"], out["0"]):
        assert torch.equal(a, b)


def test_even_masks_fold_without_changing_results(monkeypatch):
    """EVEN_S / EVEN_D (the step and channel masks folded to constants when S is a multiple of the tile
    and Dm of the channel block) give the masked kernels' outputs and gradients (bit-identical under the
    interpreter; within 1e-6 on a GPU, whose compiler may order the unmasked code differently), chunked
    and (whole tiles) in one pass; they are passed where they hold and only there."""
    from mamba_dense.kernels import triton_scan as ts

    assert ts._even("fwd", 64, 32, 32, 16) == dict(EVEN_S=True, EVEN_D=False)  # EVEN_FLAGS: no forward fold on D
    assert ts._even("bwd", 64, 16, 32, 16) == dict(EVEN_S=True, EVEN_D=True)
    assert ts._even("bwd", 60, 16, 20, 16) == dict(EVEN_S=False, EVEN_D=False)
    seen = []
    for kname in ("_fwd_kernel", "_bwd_kernel"):
        monkeypatch.setattr(ts, kname, _LaunchSpy(
            getattr(ts, kname), lambda a, kw, kname=kname: seen.append((kname, kw.get("EVEN_S"), kw.get("EVEN_D")))))
    for L, Dm in ((64, 32), (60, 20)):  # whole tiles and blocks; neither
        route = routes.cross2d(8, L // 8).to(DEVICE)
        args = _inputs(2, L, 4, Dm, 1, torch.float32, seed=13)
        dy = torch.randn(2, L, Dm, generator=torch.Generator().manual_seed(14)).to(DEVICE)
        for tpc in ((1, None) if L == 64 else (1,)):
            out = {}
            for flags in ("", "fwdS,fwdD,bwdS,bwdD"):
                monkeypatch.setenv("MAMBA_DENSE_SCAN_EVEN", flags)
                seen.clear()
                y, st = ts.scan_fwd(*args, route, "sum", True, torch.float32, True, tiles_per_chunk=tpc)
                out[flags] = (y, *ts.scan_bwd(dy, *args, route, st, "sum", True, tiles_per_chunk=tpc))
                fold = bool(flags) and L % 32 == 0
                assert seen and all(s_ == fold and d_ == (fold and Dm % 16 == 0) for _, s_, d_ in seen), seen
            for a, b in zip(out[""], out["fwdS,fwdD,bwdS,bwdD"]):
                assert torch.isfinite(a).all()
                if DEVICE == "cpu":
                    assert torch.equal(a, b)
                else:  # the compiler may contract and order the unmasked code differently
                    assert _rel(a, b) < 1e-6


class _LaunchSpy:
    """Stands in for a Triton kernel: record(args, meta) sees every launch, which then runs the real
    kernel (launch() sends anything that is not a JITFunction through fn[grid])."""

    def __init__(self, real, record):
        self.real, self.record = real, record

    def __getitem__(self, grid):
        def run(*a, **kw):
            self.record(a, kw)
            return self.real[grid](*a, **kw)
        return run


PAIR_CASES = [
    # id, route builder, L, Dm, N, tiles per chunk
    ("cross2d-n1", lambda: routes.cross2d(8, 8), 64, 20, 1, 1),
    ("segmamba3d-n4", lambda: routes.segmamba3d(4, 4, 4), 64, 8, 4, 2),
    ("localmamba-padded-windows", lambda: routes.localmamba(7, 8, ("w2", "h", "w2_flip")), 56, 9, 2, 1),
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_pair_merge_forward_matches_reference(case, monkeypatch):
    """The pair merge (the default for chunk-parallel forwards over reversed route pairs): one
    program walks route k's chunk and its reverse's mirrored chunk and adds both into the output in
    place, group after group. On poisoned buffers, its outputs and saved states match the fp64
    reference and the per-route buffer merge, and the backward from its states gives the reference
    gradients."""
    from mamba_dense.kernels import triton_scan as ts

    _, rb, L, Dm, N, tpc = case
    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")
    monkeypatch.setattr(ts, "PAIR_MAX_N", 16)  # the kernel for N > 1 too (the policy takes N = 1 only)
    route = rb().to(DEVICE)
    K = route.shape[0]
    args = _inputs(2, L, K, Dm, N, torch.float64, seed=len(case[0]))
    seen = []  # phase, merge mode, reps and route group (k0, k_pair) of every forward launch
    monkeypatch.setattr(ts, "_fwd_kernel", _LaunchSpy(
        ts._fwd_kernel, lambda a, kw: seen.append((kw["PHASE"], kw["MODE"], kw.get("REPS", 1), a[17], a[21]))))
    monkeypatch.setenv("MAMBA_DENSE_MERGE", "pairs")
    y, st = ts.scan_fwd(*args, route, "sum", True, torch.float64, True, tiles_per_chunk=tpc)
    groups = ts.route_groups(route)
    # phase 1 (chunk-end states) per route, then the output pass group after group, single routes first
    pairs = [(g[0], g[-1] if len(g) == 2 else -1) for g in ts._group_order(groups, ts.FWD_GROUP_ORDER)]
    assert seen == [(1, 0, 1, 0, 0)] + [(0, 5, 2, *p) for p in pairs]
    seen.clear()
    monkeypatch.setenv("MAMBA_DENSE_MERGE", "buffer")
    y_buf, st_buf = ts.scan_fwd(*args, route, "sum", True, torch.float64, True, tiles_per_chunk=tpc)
    assert [(ph, m, r) for ph, m, r, *_ in seen] == [(1, 0, 1), (0, 0, 1)]
    leaves = [a.clone().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*leaves, route=route, merge="sum")
    assert torch.isfinite(y).all() and torch.isfinite(st).all()
    assert _rel(y, y_ref) < 1e-10
    torch.testing.assert_close(y, y_buf, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st, st_buf, rtol=0, atol=0)
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, leaves, dy)
    grads = ts.scan_bwd(dy, *args, route, st, "sum", True, tiles_per_chunk=tpc)
    for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), grads, g_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-10, name


@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_pair_merge_backward_matches_reference(case, monkeypatch):
    """The backward's dx merge by reversed route pairs (chunk-parallel, merge="sum"): group after
    group, one program runs the gradient pass of route k's chunk and then of its reverse's mirrored
    chunk, and adds both routes' dx in place. On poisoned buffers its gradients match the fp64
    reference and the per-route buffer merge (BWD_PAIRS = 0)."""
    from mamba_dense.kernels import triton_scan as ts

    _, rb, L, Dm, N, tpc = case
    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")
    monkeypatch.setattr(ts, "PAIR_MAX_N", 16)  # the kernel for N > 1 too (the policy takes N = 1 only)
    route = rb().to(DEVICE)
    K = route.shape[0]
    args = _inputs(2, L, K, Dm, N, torch.float64, seed=len(case[0]) + 1)
    leaves = [a.clone().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*leaves, route=route, merge="sum")
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, leaves, dy)
    monkeypatch.setenv("MAMBA_DENSE_MERGE", "pairs")
    _, st = ts.scan_fwd(*args, route, "sum", True, torch.float64, True, tiles_per_chunk=tpc)
    seen = []  # phase, dx mode, reps and route group (k0, k_pair) of every backward launch
    monkeypatch.setattr(ts, "_bwd_kernel", _LaunchSpy(
        ts._bwd_kernel, lambda a, kw: seen.append((kw["PHASE"], kw["DXMODE"], kw.get("REPS", 1), a[26], a[31]))))
    monkeypatch.setattr(ts, "BWD_PAIR_MIN_BD", 1)  # the policy takes blocks of 32 only (fp64 runs 16)
    pairs = [(g[0], g[-1] if len(g) == 2 else -1) for g in ts._group_order(ts.route_groups(route), ts.BWD_GROUP_ORDER)]
    runs = []
    for early in ((1, 0) if case[0] == "cross2d-n1" else (1,)):  # the running sum loaded early / at the store
        monkeypatch.setattr(ts, "BWD_PAIR_PREV_EARLY", early)
        seen.clear()
        runs.append(ts.scan_bwd(dy, *args, route, st, "sum", True, tiles_per_chunk=tpc))
        assert seen == [(1, 4, 1, 0, 0)] + [(0, 5, 2, *p) for p in pairs]
    seen.clear()
    monkeypatch.setattr(ts, "BWD_PAIRS", 0)
    grads_buf = ts.scan_bwd(dy, *args, route, st, "sum", True, tiles_per_chunk=tpc)
    assert [(ph, m, r) for ph, m, r, *_ in seen] == [(1, 4, 1), (0, 0, 1)]
    for grads in runs:
        for name, a, b, c in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), grads, g_ref, grads_buf):
            assert torch.isfinite(a).all(), name
            assert _rel(a, b) < 1e-10, name
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_pair_merge_needs_mirrored_chunks(monkeypatch):
    """No pair merge where it cannot hold: a route length not a multiple of the tile, tiles per chunk
    that do not divide the route, merge="none", one x per route, or an fp16 output; nor (measured
    slower) for N > 1."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setenv("MAMBA_DENSE_MERGE", "pairs")
    r = routes.cross2d(8, 8)
    cover = (True,) * 4
    assert ts._pair_plan(r, "sum", False, cover, 64, 16, 4, 1, torch.bfloat16, 1, exact=True) == (((0, 2), (1, 3)), 1)
    assert ts._pair_plan(r, "sum", False, cover, 64, 16, 4, 3, torch.bfloat16, 1, exact=True) is None
    assert ts._pair_plan(r, "sum", False, cover, 60, 16, 4, 1, torch.bfloat16, 1, exact=True) is None
    assert ts._pair_plan(r, "none", False, cover, 64, 16, 4, 1, torch.bfloat16, 1, exact=True) is None
    assert ts._pair_plan(r, "sum", True, cover, 64, 16, 4, 1, torch.bfloat16, 1, exact=True) is None
    assert ts._pair_plan(r, "sum", False, cover, 64, 16, 4, 1, torch.float16, 1, exact=True) is None
    assert ts._pair_plan(r, "sum", False, (False,) * 4, 64, 16, 4, 1, torch.bfloat16, 1, exact=True) is None
    assert ts._pair_plan(r, "sum", False, cover, 64, 16, 4, 4, torch.bfloat16, 1, exact=True) is None  # one pass
    assert ts._pair_plan(r, "sum", False, cover, 64, 16, 4, 1, torch.bfloat16, 16, exact=True) is None  # N=16 loses
    monkeypatch.setenv("MAMBA_DENSE_MERGE", "buffer")
    assert ts._pair_plan(r, "sum", False, cover, 64, 16, 4, 1, torch.bfloat16, 1, exact=True) is None


def test_forward_plan_cache_follows_inputs_and_knobs(monkeypatch):
    """scan_fwd decides once per call signature (_fwd_plan): a repeated call reuses the plan and gives
    bit-identical results; a changed knob, dtype, shape or route builds a new plan that matches what a
    call without the cache (MAMBA_DENSE_SCAN_PLAN=0) does; on a GPU the cached launch sites call the
    compiled kernels directly and a misaligned input gets a plan of its own."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setattr(ts, "_FWD_PLANS", {})
    route = routes.cross2d(8, 8).to(DEVICE)
    args = _inputs(2, 64, 4, 20, 1, torch.float32, seed=11)

    def fwd(*a, r=route, **kw):
        return ts.scan_fwd(*a, r, "sum", True, None, True, tiles_per_chunk=1, **kw)

    y1, s1 = fwd(*args)
    assert len(ts._FWD_PLANS) == 1
    (plan,) = ts._FWD_PLANS.values()
    assert plan.chunked and plan.groups == [(1, 3), (0, 2)]  # the pair merge, row pair last
    y2, s2 = fwd(*args)
    assert len(ts._FWD_PLANS) == 1 and torch.equal(y1, y2) and torch.equal(s1, s2)
    if DEVICE == "cuda":  # the second call went through the sites' compiled kernels
        assert {k for k, site in plan.sites.items() if site[1] is not None} == {
            "phase1", "carry", ("group", 0), ("group", 1)}
    monkeypatch.setenv("MAMBA_DENSE_SCAN_PLAN", "0")
    y0, s0 = fwd(*args)
    assert len(ts._FWD_PLANS) == 1 and torch.equal(y0, y1) and torch.equal(s0, s1)
    monkeypatch.delenv("MAMBA_DENSE_SCAN_PLAN")
    # a knob the decisions read: the buffer merge instead of the pairs, a plan of its own
    monkeypatch.setenv("MAMBA_DENSE_MERGE", "buffer")
    yb, sb = fwd(*args)
    assert len(ts._FWD_PLANS) == 2 and list(ts._FWD_PLANS.values())[-1].groups is None
    torch.testing.assert_close(yb, y1, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("MAMBA_DENSE_MERGE")
    # a module attribute of the policy, a route with other merge groups, another dtype
    monkeypatch.setattr(ts, "FWD_GROUP_ORDER", 0)
    fwd(*args)
    assert len(ts._FWD_PLANS) == 3 and list(ts._FWD_PLANS.values())[-1].groups == [(0, 2), (1, 3)]
    r2 = torch.stack([routes.raster(8, 8), routes.column(8, 8), routes.raster(8, 8).flip(0),
                      routes.column(8, 8)]).to(DEVICE)  # routes 0 and 2 are each other's reverse; 1 and 3 not
    y_r2, _ = fwd(*args, r=r2)
    assert len(ts._FWD_PLANS) == 4 and list(ts._FWD_PLANS.values())[-1].groups == [(1,), (3,), (0, 2)]
    ref = selective_scan_ref(*[a.double() for a in args], route=r2, merge="sum")
    assert _rel(y_r2, ref) < 1e-5
    fwd(*[a.double() for a in args])
    assert len(ts._FWD_PLANS) == 5
    # an input 16-byte misaligned (a view one element in): Triton specializes on the alignment
    xs = torch.empty(args[0].numel() + 1, device=DEVICE, dtype=args[0].dtype)[1:].view_as(args[0])
    xs.copy_(args[0])
    y_mis, s_mis = fwd(xs, *args[1:])
    assert len(ts._FWD_PLANS) == 6
    torch.testing.assert_close(y_mis, y1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_mis, s1, rtol=1e-6, atol=1e-6)


def test_plan_cache_follows_the_state_size(monkeypatch):
    """The plans' keys hold A's shape: one process scanning the same tokens with another state size
    (layers of different d_state, or a sweep) gets the tiles of that size. The forward's key once left
    N out, so N = 4 then N = 16 at one x shape ran N = 16 on N = 4's tiles (error 0.76, NaN
    gradients). N = 48 takes the narrower channel blocks of more than 16 states (_config)."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setattr(ts, "_FWD_PLANS", {})
    monkeypatch.setattr(ts, "_BWD_PLANS", {})
    route = routes.cross2d(3, 4).to(DEVICE)
    for N in (4, 16, 1, 48):
        args = _inputs(1, 12, 4, 6, N, torch.float32, seed=20 + N)
        ins = [a.clone().requires_grad_() for a in args]
        y = selective_scan(*ins, route=route)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
        g = torch.autograd.grad(y, ins, dy.to(DEVICE, y.dtype))
        ref_in = [a.detach().double().requires_grad_() for a in args]
        y_ref = selective_scan_ref(*ref_in, route=route)
        g_ref = torch.autograd.grad(y_ref, ref_in, dy.to(y_ref.device))
        assert _rel(y, y_ref) < 1e-5, N
        for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), g, g_ref):
            assert _rel(a, b) < 1e-5, (N, name)
    assert len(ts._FWD_PLANS) == 4 and len(ts._BWD_PLANS) == 4


def test_tiles_above_16_states():
    """Above 16 states the forward's channel blocks shrink with the padded state size and the backward
    runs blocks of 8 (NP = 32) or 4 channels on NP / 32 warps (at N = 64 the N = 16 tiles made ptxas
    spill 10 kB a thread in the backward); N <= 16 keeps its tiles."""
    from mamba_dense.kernels import triton_scan as ts

    base = ts._config(16, 192, torch.bfloat16)
    assert (base.T, base.BDf, base.BDb, base.warps, base.warps_b) == (8, 16, 8, 1, 1)
    for N, bdf, bdb, wb in ((17, 8, 8, 1), (32, 8, 8, 1), (64, 4, 4, 2), (100, 2, 4, 4), (128, 2, 4, 4),
                            (256, 1, 4, 8)):
        cfg = ts._config(N, 192, torch.bfloat16)
        assert (cfg.T, cfg.BDf, cfg.BDb, cfg.warps, cfg.warps_b) == (8, bdf, bdb, 1, wb), N
    assert ts._config(64, 192, torch.float64).BDf == 4
    assert ts._config(64, 3, torch.bfloat16).BDb == 4  # blocks cap at max(8, Dm rounded up): unchanged here
    assert ts._Cfg(8, 16, 8, 2, 8).warps_b == 0  # an override without backward warps: the backward takes warps


def test_backward_plan_cache_follows_inputs_and_knobs(monkeypatch):
    """scan_bwd's plan cache (_bwd_plan), as the forward's: repeated calls give bit-identical gradients,
    equal to a call without the cache; a changed knob or a misaligned dy builds a new plan; on a GPU
    the sites hold compiled kernels after the second call."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setattr(ts, "_BWD_PLANS", {})
    route = routes.cross2d(8, 8).to(DEVICE)
    args = _inputs(2, 64, 4, 32, 1, torch.float32, seed=12)
    _, st = ts.scan_fwd(*args, route, "sum", True, None, True, tiles_per_chunk=1)
    dy = torch.randn(2, 64, 32, dtype=torch.float32, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def bwd(d=dy):
        return ts.scan_bwd(d, *args, route, st, "sum", True, tiles_per_chunk=1)

    g1, g2 = bwd(), bwd()
    assert len(ts._BWD_PLANS) == 1
    (plan,) = ts._BWD_PLANS.values()
    assert plan.chunked
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    if DEVICE == "cuda":  # the launches' sites hold their compiled kernels (one dB / dC block: no block sum)
        assert {k for k, site in plan.sites.items() if site[1] is not None} == {
            "phase1", "carry", ("group", 0), ("group", 1), "sum_params"}
    monkeypatch.setenv("MAMBA_DENSE_SCAN_PLAN", "0")
    for a, b in zip(g1, bwd()):
        assert torch.equal(a, b)
    monkeypatch.delenv("MAMBA_DENSE_SCAN_PLAN")
    monkeypatch.setattr(ts, "BWD_PAIRS", 0)  # a policy attribute: the per-route dx buffer instead
    gb = bwd()
    assert len(ts._BWD_PLANS) == 2 and list(ts._BWD_PLANS.values())[-1].groups is None
    for a, b in zip(g1, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    dys = torch.empty(dy.numel() + 1, device=DEVICE, dtype=dy.dtype)[1:].view_as(dy)
    dys.copy_(dy)
    gm = bwd(dys)
    assert len(ts._BWD_PLANS) == 3
    for a, b in zip(gb, gm):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_programmatic_dependent_launch_decision(monkeypatch):
    """Programmatic dependent launch (PDL) is a plan decision: never under Triton's interpreter, on a CPU
    tensor or on a GPU before Hopper; MAMBA_DENSE_SCAN_PDL chooses the mode (0 / 1 / 2) and is part of
    the plans' keys; a PDL launch carries the kernel's PDL constexpr and Triton's launch_pdl option."""
    from mamba_dense.kernels import triton_scan as ts

    assert ts._pdl_meta(1) == {"PDL": 1, "launch_pdl": True} and ts._pdl_meta(0) == {}
    assert "MAMBA_DENSE_SCAN_PDL" in ts._PLAN_ENV
    cpu = torch.device("cpu")
    for mode in ("0", "1", "2"):
        monkeypatch.setenv("MAMBA_DENSE_SCAN_PDL", mode)
        assert not ts._pdl_ok(cpu) and ts._pdl_on(cpu) == 0
    monkeypatch.setenv("MAMBA_DENSE_SCAN_PDL", "yes")
    with pytest.raises(ValueError, match="MAMBA_DENSE_SCAN_PDL='yes'"):
        ts._pdl_on(cpu)
    if DEVICE == "cuda":
        dev = torch.device(DEVICE, torch.cuda.current_device())
        if torch.cuda.get_device_capability(dev)[0] < 9:
            assert not ts._pdl_ok(dev)
        monkeypatch.setenv("MAMBA_DENSE_SCAN_PDL", "2")
        assert ts._pdl_on(dev) == (2 if ts._pdl_ok(dev) else 0)
        monkeypatch.setenv("MAMBA_DENSE_SCAN_PDL", "0")
        assert ts._pdl_on(dev) == 0


@pytest.mark.skipif(DEVICE == "cpu", reason="programmatic dependent launch needs a GPU (Hopper or later)")
@pytest.mark.parametrize("N", [1, 16])
def test_programmatic_dependent_launch_same_results(N, monkeypatch):
    """The scan's kernels launched with programmatic dependent launch (PDL 1 / 2: each waits at its start
    for the kernel before it, _pdl_start) give bit-identical outputs, states and gradients to plain
    launches, chunk-parallel with pair merges (N=1) and per-route buffers (N=16); where PDL is taken
    (Hopper or later), every compiled kernel at the plans' launch sites carries launch_pdl."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setattr(ts, "_FWD_PLANS", {})
    monkeypatch.setattr(ts, "_BWD_PLANS", {})
    route = routes.cross2d(8, 12).to(DEVICE)
    args = _inputs(2, 96, 4, 40, N, torch.float32, seed=31 + N)
    dy = torch.randn(2, 96, 40, dtype=torch.float32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    dev = args[0].device
    res = {}
    for pdl in ("0", "1", "2"):
        monkeypatch.setenv("MAMBA_DENSE_SCAN_PDL", pdl)
        y, st = ts.scan_fwd(*args, route, "sum", True, None, True, tiles_per_chunk=2)
        g = ts.scan_bwd(dy, *args, route, st, "sum", True, tiles_per_chunk=2)
        g = ts.scan_bwd(dy, *args, route, st, "sum", True, tiles_per_chunk=2)  # through the plans' sites
        res[pdl] = (y, st, *[t for t in g if t is not None])
        if pdl != "0" and ts._pdl_on(dev):
            for plans in (ts._FWD_PLANS, ts._BWD_PLANS):
                p = list(plans.values())[-1]
                assert p.pdl == int(pdl)
                sites = [s for s in p.sites.values() if s[1] is not None]
                assert sites and all(s[1][0].metadata.launch_pdl for s in sites)
    for pdl in ("1", "2"):
        for a, b in zip(res[pdl], res["0"]):
            assert torch.isfinite(a).all()
            assert torch.equal(a, b)
    ref = [t.double() for t in args]
    assert _rel(res["1"][0], selective_scan_ref(*ref, route=route)) < 1e-4


@pytest.mark.parametrize("N, route_fn, L, batch, tpc", [
    (1, lambda: routes.cross2d(3, 4), 12, 7, None),  # 7 batch elements: slices of 3, 3, 1
    (4, lambda: routes.cross2d(6, 8), 48, 2, 1),  # a chunk override with batch x K = 8 carry rows
    (1, lambda: routes.bidirectional(200), 200, 1, 1),  # chunks of 1 tile would be more than 3
])
def test_grids_stay_within_cuda_limits(N, route_fn, L, batch, tpc, monkeypatch):
    """CUDA caps a grid's second and third dimensions at 65535 programs (triton_scan.MAX_GRID_YZ); a
    larger batch (many small regions folded into it) failed in the launch. Here the limit is set to 3:
    every launch of the forward and backward keeps its grid within it (batch slices, no chunks for more
    batch x K carry rows, no more chunks than the limit), and the results match the fp64 reference."""
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setattr(ts, "MAX_GRID_YZ", 3)
    monkeypatch.setattr(ts, "_FWD_PLANS", {})  # plans made under the real limit must not be reused
    monkeypatch.setattr(ts, "_BWD_PLANS", {})
    grids = []
    real_launch = ts.launch

    def recording_launch(fn, grid, *args, **meta):
        grids.append(tuple(grid))
        return real_launch(fn, grid, *args, **meta)

    monkeypatch.setattr(ts, "launch", recording_launch)
    route = route_fn().to(DEVICE)
    K = route.shape[0]
    args = _inputs(batch, L, K, 5, N, torch.float64, seed=31 * N + batch)
    leaves = [a.clone().requires_grad_() for a in args]
    y_ref = selective_scan_ref(*leaves, route=route)
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, leaves, dy)
    y, states = ts.scan_fwd(*args, route, "sum", True, torch.float64, True, tiles_per_chunk=tpc)
    grads = ts.scan_bwd(dy, *args, route, states, "sum", True, tiles_per_chunk=tpc)
    assert grids and all(d <= 3 for g in grids for d in g[1:]), grids
    assert max(g[2] for g in grids if len(g) == 3) == min(batch, 3)
    assert _rel(y, y_ref) < 1e-10
    for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), grads, g_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-10, name
    with torch.no_grad():  # the public op's inference path (no states saved)
        assert _rel(selective_scan(*args, route=route), y_ref) < 1e-10
    assert all(d <= 3 for g in grids for d in g[1:]), grids
