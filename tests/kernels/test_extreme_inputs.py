"""Issue 8: the scan stays finite, and as accurate as the inputs allow, at extreme but legal inputs.

Extremes: dt in [-1e4, 1e4] before softplus (exactly +-1e4 included), dt_bias down to -20, A down
to -1e4 mixed with -1e-4, L = 2^20, and float32 / bfloat16 / float16 inputs (1e4 is exact in fp16,
bf16 rounds it to 9984); always with dt_softplus=True.

* Triton kernels (CPU CI: Triton's interpreter, small shapes; on a GPU the same tests run compiled)
  and the PyTorch reference, forward and the gradients of all seven inputs, against an fp64 run of
  the reference on the same (rounded) inputs. Kernel outputs are poisoned with NaN
  (MAMBA_DENSE_POISON=1), so an element the kernels forget to write shows up as a NaN.
* The chunk-parallel path of the kernels (phase 1 / carry / phase 3, forward and backward) at
  moderate L with the same extremes (tiles_per_chunk forced, and the automatic policy forced on).
* L = 2^20 on the reference (CPU path): against fp64, and against closed forms for constant inputs.

Is a relative (Frobenius) error against fp64 meaningful at these extremes?
* softplus(1e4) = 1e4 and exp(delta * A) = exp(-1e8) = 0 exactly in fp32 and fp64 alike: such a
  step resets the state to delta * x * B, so the output at a token is dominated by its own input.
  That is well conditioned (nothing cancels); errors stay at a few ulps.
* exp(delta * A) that does not underflow has |delta * A| < ~104, so its relative error is at most
  ~100 eps; the kernels' backward forms a_s * h_{s-1} as h_s - u_s, whose cancellation error
  |A| ulp(u_s) relative to x * B is again |delta * A| eps <= ~100 eps (0 when a_s underflows to 0).
* Sums with random signs (over N, over the routes, over b * L for dA / dD / dbias) can cancel, but
  the Frobenius norm over a whole tensor is carried by its large entries; measured errors are
  ~1e-7 in fp32 (tolerance 1e-4).
* What does not make sense: comparing fp16 entries whose true value exceeds 65504. Those must be
  +-inf (an honest overflow of the result dtype, the state itself is fp32 and finite); they are
  checked for the sign of inf and left out of the norm. A NaN is never acceptable.
* A "quiet" channel (dt ~ N(0, 1), dt_bias = -20, so delta ~ 2e-9 at every step; D = 0, so its
  output is the tiny state itself) is also checked on its own: its values are ~1e-9 and vanish in
  the norm of the whole tensor. This check found the bug fixed in triton_scan._softplus (below).
* At L = 2^20 with decays a = exp(delta * A) = 1 - O(1e-5), fp32 holds the decay rate 1 - a only
  to eps / |delta * A| ~ 3e-3 relative, and the state sums ~1e4..1e5 random-sign terms; a
  relative error of ~1e-4 there is a property of fp32, not of the scan (see
  test_reference_2pow20_quiet_state, which bounds it elementwise against a scan of |inputs|).

Bug found and fixed: the kernels computed softplus as log(1 + exp(v)), which in fp32 has relative
error eps / exp(v): ~1e-3 at v = -9, and delta = 0 (instead of ~2e-9) for v < -16.6, so with
dt_bias = -20 fp32 gradients were off by up to 3e-4 and the quiet channel's output was (almost)
zero (relative error 0.7..1; 2.6e-8 even in fp64). It is now log1p computed as
log(w) - ((w - 1) - z) / w, w = 1 + z, z = exp(v) (test_softplus_accuracy).

Runtime (2 shared CPU cores, OMP_NUM_THREADS=1, Triton interpreter): ~30 s for the file; the
L = 2^20 reference runs take ~1 s each (forward and backward, fp32 and fp64 together).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mamba_dense.kernels import routes, selective_scan, selective_scan_ref
from mamba_dense.kernels import triton_scan as ts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)"
)

# The interpreter runs the kernels in numpy, which warns about two correct results: sigmoid(-1e4)
# = 1 / (1 + exp(1e4)) = 1 / inf = 0, and fp16 gradients beyond 65504 stored as inf.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

F16_MAX = torch.finfo(torch.float16).max
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
NAMES = ("dx", "ddt", "dA", "dB", "dC", "dD", "dbias")


@pytest.fixture
def triton_path(monkeypatch):
    """selective_scan on CPU tensors runs the Triton kernels (interpreter); outputs start as NaN."""
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")


@pytest.fixture
def reference_path(monkeypatch):
    """selective_scan on CPU tensors runs the PyTorch reference."""
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "0")


# --------------------------------------------------------------------------------------------
# inputs and checks
# --------------------------------------------------------------------------------------------


def _extreme_inputs(batch, L, K, Dm, N, seed):
    """float64 (x, dt, A, B, C, D, dt_bias) at the issue's extremes; channel Dm-1 is "quiet".

    dt: a quarter exactly +1e4, a quarter exactly -1e4, a quarter +-10^U(0, 4), a quarter N(0, 4).
    A: -10^U(-4, 4), with -1e4 and -1e-4 present in channels 0 and 1 (mixed in one channel if N > 1).
    dt_bias: U(-20, 2), exactly -20 in channel 0. B, C, x, D: N(0, 1).
    Quiet channel: dt ~ N(0, 1) and dt_bias = -20 (delta ~ 2e-9 everywhere), D = 0.
    """
    assert Dm >= 3
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    shape = (batch, L, K, Dm)
    x = torch.randn(batch, L, Dm, **f)
    B = torch.randn(batch, L, K, N, **f)
    C = torch.randn(batch, L, K, N, **f)
    kind = torch.randint(0, 4, shape, generator=g)
    sign = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    loguniform = sign * 10 ** (4 * torch.rand(shape, **f))
    normal = 2 * torch.randn(shape, **f)
    dt = torch.where(kind == 0, 1e4, torch.where(kind == 1, -1e4, torch.where(kind == 2, loguniform, normal)))
    A = -(10 ** (8 * torch.rand(K, Dm, N, **f) - 4))
    A[:, 0, 0], A[:, 1, 0] = -1e4, -1e-4
    if N > 1:
        A[:, 0, 1], A[:, 1, 1] = -1e-4, -1e4
    D = torch.randn(K, Dm, **f)
    bias = -20 + 22 * torch.rand(K, Dm, **f)
    bias[:, 0] = -20.0
    q = Dm - 1
    dt[..., q] = torch.randn(batch, L, K, **f)
    bias[:, q] = -20.0
    D[:, q] = 0.0
    return [x, dt, A, B, C, D, bias]


def _cast(args, dtype, params_too=False, device=DEVICE):
    """Activations (x, dt, B, C) to ``dtype``; parameters (A, D, dt_bias) stay fp32 unless params_too
    (as under autocast, where parameters are fp32). fp64 stays fp64 throughout."""
    pdt = dtype if (params_too or dtype == torch.float64) else torch.float32
    return [a.to(device, dtype if i in (0, 1, 3, 4) else pdt) for i, a in enumerate(args)]


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _check(name, got, ref, tol):
    """No NaN; fp16 entries whose fp64 value is beyond the fp16 range must be +-inf with the right
    sign (honest overflow), all others finite; relative Frobenius error of the in-range entries."""
    is_f16 = got.dtype == torch.float16
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert torch.isfinite(ref).all(), f"{name}: the fp64 reference itself is not finite"
    assert not torch.isnan(got).any(), f"{name}: NaN ({int(torch.isnan(got).sum())} of {got.numel()})"
    keep = torch.ones_like(ref, dtype=torch.bool)
    if is_f16:
        over = ref.abs() > 1.01 * F16_MAX
        assert torch.equal(got[over], torch.copysign(torch.full_like(ref[over], math.inf), ref[over])), (
            f"{name}: an entry beyond the fp16 range is not +-inf of the right sign"
        )
        keep = ref.abs() < 0.99 * F16_MAX  # the 1% band around 65504 may round either way
    assert torch.isfinite(got[keep]).all(), f"{name}: inf where the true value is in range"
    err = _rel(got[keep], ref[keep])
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"
    return err


def _fp64_reference(args, route, merge, dy):
    leaves = [a.detach().to("cpu", torch.float64).requires_grad_() for a in args]
    y = selective_scan_ref(*leaves, route=route.cpu(), merge=merge)
    grads = torch.autograd.grad(y, leaves, dy.detach().to("cpu", torch.float64))
    return y.detach(), grads


def _run_and_check(args, route, merge, dtype, grad_tol):
    """Forward (fp32 output) and the gradients of all inputs through selective_scan, vs fp64."""
    leaves = [a.clone().requires_grad_() for a in args]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    y = selective_scan(*leaves, route=route, merge=merge, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(y)
    grads = torch.autograd.grad(y, leaves, dy)
    y_ref, g_ref = _fp64_reference(args, route, merge, dy)
    # the output is fp32 (or fp64) computed from the rounded inputs: fp32 accuracy for every dtype
    _check("y", y, y_ref, TOL[out_dtype])
    q = args[0].shape[-1] - 1
    _check("y (quiet channel)", y[..., q], y_ref[..., q], TOL[out_dtype])
    for name, a, b, leaf in zip(NAMES, grads, g_ref, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        _check(name, a, b, grad_tol if leaf.dtype != torch.float32 else TOL[out_dtype])
    if all(a.dtype in (torch.float32, torch.float64) for a in args):
        # the quiet channel's own gradients (~1e-9 .. 1e-18) are accurate too
        _check("ddt (quiet channel)", grads[1][..., q], g_ref[1][..., q], TOL[out_dtype])
        _check("dA (quiet channel)", grads[2][:, q], g_ref[2][:, q], TOL[out_dtype])
    return y, grads


# --------------------------------------------------------------------------------------------
# softplus in the kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _softplus_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(v_ptr + i, mask=m, other=0.0)
    tl.store(out_ptr + i, ts._softplus(v), mask=m)


@needs_triton
def test_softplus_accuracy():
    """The kernels' softplus vs fp64 log1p(exp(v)): a few ulps from v = -80 up to 1e4, exactly 1e4
    at 1e4, ~0 (never NaN) below fp32's exp underflow, down to -1e4."""
    v = torch.cat([
        torch.linspace(-80.0, 30.0, 4001, dtype=torch.float64),
        torch.tensor([-16.6, -17.0, -20.0, -21.0, 19.999, 20.0, 20.001, 1e2, 1e3, 9984.0, 1e4]),
    ]).float()
    low = torch.tensor([-1e4, -1e3, -200.0, -104.0, -90.0])
    vv = torch.cat([v, low.float()]).to(DEVICE)
    out = torch.empty_like(vv)
    _softplus_kernel[(triton.cdiv(vv.numel(), 1024),)](vv, out, vv.numel(), BLOCK=1024)
    out = out.cpu().double()
    ref = F.softplus(vv.cpu().double())
    n = v.numel()
    # softplus(v) ~ exp(v) has condition number |v| for v << 0: an exp that rounds v * log2(e)
    # (the GPU's ex2.approx) is allowed |v| eps on top of a few ulps. Measured (interpreter, numpy
    # fp32): max 3.4e-7 relative; the old log(1 + exp(v)) had 1.0 (delta = 0 below v = -16.6).
    err = (out[:n] - ref[:n]).abs() / ref[:n]
    bound = (8 + v.double().abs()) * torch.finfo(torch.float32).eps
    assert (err <= bound).all(), f"max relative error {float(err.max()):.3g} at v = {float(v[(err / bound).argmax()])}"
    assert out[:n][v == 1e4].item() == 1e4
    tail = out[n:]
    assert torch.isfinite(tail).all() and (tail >= 0).all() and (tail <= 2e-38).all()


# --------------------------------------------------------------------------------------------
# short sequences: Triton kernels and the reference, forward and backward
# --------------------------------------------------------------------------------------------

# id, route builder, batch, D, N, merge, merge strategy
SHAPES = {
    "cross2d-N4-D8": (lambda: routes.cross2d(6, 8), 2, 8, 4, "sum", "buffer"),
    "window-pad-N1-D4-serial": (lambda: routes.localmamba(5, 6, ("h", "w7_flip")), 1, 4, 1, "sum", "serial"),
    "bidir-N4-D4-none": (lambda: routes.bidirectional(40), 1, 4, 4, "none", "buffer"),
}
# (shape, input dtype, parameters in the input dtype too)
RUNS = [
    ("cross2d-N4-D8", torch.float32, False),
    ("cross2d-N4-D8", torch.bfloat16, False),
    ("cross2d-N4-D8", torch.float16, False),
    ("window-pad-N1-D4-serial", torch.float32, False),
    ("window-pad-N1-D4-serial", torch.float16, True),
    ("bidir-N4-D4-none", torch.bfloat16, True),
    ("bidir-N4-D4-none", torch.float64, False),
]


def _run_id(r):
    return f"{r[0]}-{str(r[1]).split('.')[1]}" + ("-params" if r[2] else "")


def _short_case(run, monkeypatch, device):
    shape, dtype, params_too = run
    rb, batch, Dm, N, merge, strategy = SHAPES[shape]
    monkeypatch.setenv("MAMBA_DENSE_MERGE", strategy)
    route = rb().to(device)
    L = int(route.max()) + 1
    base = _extreme_inputs(batch, L, route.shape[0], Dm, N, seed=len(shape) + N)
    return _cast(base, dtype, params_too, device), route, merge, dtype


@needs_triton
@pytest.mark.parametrize("run", RUNS, ids=[_run_id(r) for r in RUNS])
def test_triton_extreme_forward_backward(run, triton_path, monkeypatch):
    args, route, merge, dtype = _short_case(run, monkeypatch, DEVICE)
    _run_and_check(args, route, merge, dtype, TOL[dtype])


@pytest.mark.parametrize("run", RUNS, ids=[_run_id(r) for r in RUNS])
def test_reference_extreme_forward_backward(run, reference_path, monkeypatch):
    args, route, merge, dtype = _short_case(run, monkeypatch, "cpu")
    _run_and_check(args, route, merge, dtype, TOL[dtype])


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_fp16_output_overflow_is_honest(path, monkeypatch):
    """delta = 1e4 makes outputs of ~1e5: with out_dtype=float32 they are finite and accurate; with
    the default fp16 output they are +-inf exactly where the true value is beyond 65504 (the output
    dtype overflows; the fp32 state never does), finite and accurate elsewhere, and never NaN.
    bf16 output (range 3e38) stays finite, to bf16 rounding."""
    if path == "triton":
        if DEVICE == "cpu" and not INTERPRET:
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")
        monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
        monkeypatch.setenv("MAMBA_DENSE_POISON", "1")
        device = DEVICE
    else:
        monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "0")
        device = "cpu"
    route = routes.cross2d(5, 6).to(device)
    base = _extreme_inputs(1, 30, 4, 4, 4, seed=5)
    base[1][..., :-1] = torch.where(base[1][..., :-1] > 0, 1e4, base[1][..., :-1])  # more 1e4 steps
    for merge in ("sum", "none"):
        a16 = _cast(base, torch.float16, device=device)
        ref = selective_scan_ref(*[a.cpu().double() for a in a16], route=route.cpu(), merge=merge)
        y16 = selective_scan(*a16, route=route, merge=merge)
        y32 = selective_scan(*a16, route=route, merge=merge, out_dtype=torch.float32)
        assert y16.dtype == torch.float16 and y32.dtype == torch.float32
        assert (ref.abs() > 1.01 * F16_MAX).any() and (ref.abs() < 0.99 * F16_MAX).any()  # both occur
        _check(f"y fp32 ({merge})", y32, ref, TOL[torch.float32])
        _check(f"y fp16 ({merge})", y16, ref, 2e-3)  # fp16 rounding of the in-range entries
        ab = _cast(base, torch.bfloat16, device=device)
        refb = selective_scan_ref(*[a.cpu().double() for a in ab], route=route.cpu(), merge=merge)
        _check(f"y bf16 ({merge})", selective_scan(*ab, route=route, merge=merge), refb, 1e-2)


# --------------------------------------------------------------------------------------------
# chunk-parallel path of the kernels (phase 1 / carry / phase 3, forward and backward)
# --------------------------------------------------------------------------------------------

CHUNKED = [
    # route, D, N, merge, tiles per chunk, dtype
    ("bidir256-N1", lambda: routes.bidirectional(256), 4, 1, "sum", 1, torch.float32),
    ("bidir256-N1-f64", lambda: routes.bidirectional(256), 4, 1, "none", 3, torch.float64),
    ("cross2d-N4-tpc2", lambda: routes.cross2d(8, 16), 4, 4, "sum", 2, torch.bfloat16),
    # 19 forward / 38 backward chunks: more than the carry's 16 chunks per round (set below), so the
    # carries cross round boundaries
    ("bidir600-N1-19chunks", lambda: routes.bidirectional(600), 4, 1, "sum", 1, torch.float32),
]


@needs_triton
@pytest.mark.parametrize("case", CHUNKED, ids=[c[0] for c in CHUNKED])
def test_triton_chunk_parallel_extreme(case, triton_path, monkeypatch):
    """scan_fwd / scan_bwd with tiles_per_chunk forced: L = 128..600 split into 4..38 chunks, with
    steps of delta = 1e4 (carried decay exp(A * sum(delta)) = 0) and delta ~ 1e-9 (decay 1); the
    carries take 16 chunks per round."""
    _, rb, Dm, N, merge, tpc, dtype = case
    monkeypatch.setenv("MAMBA_DENSE_CARRY_CB", "16")
    route = rb().to(DEVICE)
    L = int(route.max()) + 1
    args = _cast(_extreme_inputs(1, L, route.shape[0], Dm, N, seed=L + N), dtype)
    T = ts._config(N, Dm, dtype).Tf  # the forward's tiles (the backward's are no longer)
    assert -(-route.shape[1] // T) // tpc >= 3, "the case must really run chunk-parallel"
    odt = torch.float64 if dtype == torch.float64 else torch.float32
    y, states = ts.scan_fwd(*args, route, merge, True, odt, True, tiles_per_chunk=tpc)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y)
    grads = ts.scan_bwd(dy, *args, route, states, merge, True, tiles_per_chunk=tpc)
    y_ref, g_ref = _fp64_reference(args, route, merge, dy)
    assert torch.isfinite(states).all()
    _check("y", y, y_ref, TOL[odt])
    _check("y (quiet channel)", y[..., Dm - 1], y_ref[..., Dm - 1], TOL[odt])
    for name, a, b, arg in zip(NAMES, grads, g_ref, args):
        _check(name, a, b, TOL[arg.dtype] if arg.dtype != torch.float32 else TOL[odt])


@needs_triton
def test_triton_automatic_chunking_through_autograd(triton_path, monkeypatch):
    """The automatic chunk policy (forced on: every launch counts as too small for the device)
    through the public op and autograd, fp16 activations, extreme values."""
    monkeypatch.setattr(ts, "MIN_PROGRAMS_PER_SM", 10**9)
    route = routes.bidirectional(192).to(DEVICE)
    n_tiles = -(-192 // ts._config(4, 4, torch.float16)[0])
    assert ts._tiles_per_chunk(n_tiles, 2, 1) < n_tiles  # chunk-parallel indeed
    args = _cast(_extreme_inputs(1, 192, 2, 4, 4, seed=11), torch.float16)
    _run_and_check(args, route, "sum", torch.float16, TOL[torch.float16])


# --------------------------------------------------------------------------------------------
# L = 2^20 on the reference (CPU path)
# --------------------------------------------------------------------------------------------

LONG = 2**20


def _long_inputs(regime, seed=0):
    """batch 1, one raster route, D = 2, N = 1, float64."""
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    x = torch.randn(1, LONG, 2, **f)
    B = torch.randn(1, LONG, 1, 1, **f)
    C = torch.randn(1, LONG, 1, 1, **f)
    D = torch.randn(1, 2, **f)
    if regime == "moderate":
        dt = torch.randn(1, LONG, 1, 2, **f)
        A = torch.tensor([[[-0.5], [-0.05]]], dtype=torch.float64)
        bias = torch.zeros(1, 2, dtype=torch.float64)
    else:  # a third of the steps at dt = 1e4, a third at -1e4, a third N(0, 4); bias -20
        kind = torch.randint(0, 3, (1, LONG, 1, 2), generator=g)
        dt = torch.where(kind == 0, 1e4, torch.where(kind == 1, -1e4, 2 * torch.randn(1, LONG, 1, 2, **f)))
        A = torch.tensor([[[-1e4], [-1e-4]]], dtype=torch.float64)
        bias = torch.full((1, 2), -20.0, dtype=torch.float64)
    return [x, dt, A, B, C, D, bias]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("regime", ["moderate", "extreme"])
def test_reference_2pow20_matches_fp64(regime, dtype, reference_path):
    """1,048,576 steps, forward and all gradients, vs an fp64 run on the same (rounded) inputs.
    Measured: y ~1e-7; gradients ~1e-7 (fp32 leaves) and ~2e-3 (bf16 leaves: their rounding)."""
    route = routes.stack(routes.raster(LONG))
    args = _cast(_long_inputs(regime), dtype, device="cpu")
    _run_long(args, route, dtype)


def _run_long(args, route, dtype):
    leaves = [a.clone().requires_grad_() for a in args]
    y = selective_scan(*leaves, route=route, out_dtype=torch.float32)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, leaves, dy)
    y_ref, g_ref = _fp64_reference(args, route, "sum", dy)
    _check("y", y, y_ref, TOL[torch.float32])
    for name, a, b, leaf in zip(NAMES, grads, g_ref, leaves):
        _check(name, a, b, TOL[leaf.dtype])


def test_reference_2pow20_quiet_state(reference_path):
    """delta ~ 2e-9 at all 2^20 steps (dt ~ N(0, 1), dt_bias = -20), D = 0: the output is the bare
    state, a sum of ~1e5 random terms under decays a = 1 - O(1e-13 .. 1e-5).

    fp32 holds 1 - a only to eps / |delta * A| (~3e-3 relative for A = -1e4; for A = -1e-4, a
    rounds to 1), and the sums cancel (|y| is 80..440 times below the scan of |terms|), so fp32
    need not match fp64 to 1e-4 here (measured 6.2e-5 for the A = -1e4 channel). Checked instead:
    finite, relative error < 1e-3, and elementwise |y - y64| <= c * eps32 * y_abs, with y_abs the
    fp64 scan of |x|, |B|, |C| (nothing cancels in it): c = log2(L) for the log-depth carry + 8
    chunk steps + 16 for the rounding of the decays. The 16 is empirical (the decays' rounding
    errors are random and mostly cancel; a worst-case bound would grow with the memory length
    ~1/(1 - a)); measured max ratio 7.9 eps (A = -1e-4) and 16.8 eps (A = -1e4), bound 44 eps."""
    route = routes.stack(routes.raster(LONG))
    x, dt, A, B, C, D, bias = _long_inputs("moderate", seed=1)
    A = torch.tensor([[[-1e-4], [-1e4]]], dtype=torch.float64)
    bias = torch.full((1, 2), -20.0, dtype=torch.float64)
    D = torch.zeros(1, 2, dtype=torch.float64)
    args = _cast([x, dt, A, B, C, D, bias], torch.float32, device="cpu")
    y = selective_scan(*args, route=route)
    a64 = [a.double() for a in args]
    y64 = selective_scan(*a64, route=route)
    y_abs = selective_scan(a64[0].abs(), a64[1], a64[2], a64[3].abs(), a64[4].abs(), None, a64[6], route=route)
    assert torch.isfinite(y).all()
    eps = torch.finfo(torch.float32).eps
    bound = (math.log2(LONG) + 8 + 16) * eps * y_abs
    assert ((y.double() - y64).abs() <= bound).all()
    for c in range(2):
        assert y64[..., c].abs().max() < 1e-3  # the state really is tiny
        _check(f"y channel {c}", y[..., c], y64[..., c], 1e-3)


CLOSED = [
    # id, dt, dt_bias, A: constant inputs x = B = C = 1, no D
    ("reset", 1e4, 0.0, -1e4),  # a = 0: h_t = delta = 1e4 at every step
    ("steady-1e4", 1e4, 0.0, -1e-4),  # a = e^-1: h -> 1e4 / (1 - e^-1) = 15819.77
    ("frozen", -1e4, 0.0, -1e4),  # delta = 0: h = 0, y = 0 exactly
    ("linear", 0.0, -20.0, -1e-4),  # delta = 2.06e-9, a = 1 - 2e-13: h_t ~ delta * (t + 1)
    ("moderate", 0.0, 0.0, -0.5),  # delta = log 2, a = 2^-0.5
]


@pytest.mark.parametrize("case", CLOSED, ids=[c[0] for c in CLOSED])
def test_reference_2pow20_closed_form(case, reference_path):
    """Constant inputs over 2^20 steps: h_t = delta * (1 - a^(t+1)) / (1 - a) exactly (fp64, expm1)."""
    _, dt_v, bias_v, A_v = case
    route = routes.stack(routes.raster(LONG))
    x = torch.ones(1, LONG, 1)
    dt = torch.full((1, LONG, 1, 1), dt_v)
    A = torch.full((1, 1, 1), A_v)
    B = torch.ones(1, LONG, 1, 1)
    C = torch.ones(1, LONG, 1, 1)
    bias = torch.full((1, 1), bias_v)
    y = selective_scan(x, dt, A, B, C, None, bias, route=route)[0, :, 0]
    assert torch.isfinite(y).all()
    delta = F.softplus(torch.tensor(dt_v + bias_v, dtype=torch.float64))
    la = delta * A_v
    t = torch.arange(LONG, dtype=torch.float64)
    if delta == 0:
        assert torch.equal(y, torch.zeros_like(y))
        return
    h = delta * torch.expm1((t + 1) * la) / torch.expm1(la)
    rel = ((y.double() - h).abs() / h).max()
    assert rel < 2e-6, f"max elementwise relative error {float(rel):.3g}"  # measured <= 3e-7
    if case[0] == "steady-1e4":
        assert abs(float(y[-1]) - 1e4 / (1 - math.exp(-1))) < 1e-6 * 15819.77
