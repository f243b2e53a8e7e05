"""Triton selective scan over routes: forward, chunk carry, and backward.

Layout (all contiguous, channels-last):
    x (b, L, D)   dt (b, L, K, D)   B, C (b, L, K, N)   A (K, D, N)   D, dt_bias (K, D)   route (K, S)

A program owns one (batch, route, channel block) and walks its route in tiles of T steps. Each
tile gathers its tokens through ``route`` (one contiguous channel vector per token), builds the
per-step affine maps h -> a*h + u for a [T, NP, BD] block of (step, state, channel), scans them
with ``tl.associative_scan`` along the steps, and carries the state to the next tile.

Parallelism over L: when (batch x routes x channel blocks) is too small to fill the GPU, the
forward runs in three phases: chunk-local scans from a zero state (phase 1), a carry pass over
chunk ends (phase 2), and the output pass from the carried states (phase 3). Either way the
state entering every backward tile is stored (every T steps of _config; the forward's own tiles may
be a multiple of that); the backward recomputes each tile from it and runs the reverse scan tile by
tile (no per-step state is kept).

Merge (deterministic, no float atomics; _merge_strategy): by default each route writes its outputs
(dx in the backward) to a per-route buffer that a second pass sums in a fixed order. A chunk-parallel
forward whose routes come in reversed pairs (cross2d, segmamba3d, Vim) instead lets one program walk
route k's chunk and its reverse's mirrored chunk (the same tokens) and sum both into the output in
place, one launch per route group (_pair_plan). "serial" runs one launch per route with a
read-add-write of an fp32 accumulator. A route visits each token at most once, so no two programs
of one launch touch the same element.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _launch as _launch_mod
from . import routes as _routes
from ._launch import getenv, launch

# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


def _cdiv(a: int, b: int) -> int:
    # host-side ceil division: triton.cdiv / next_power_of_2 are constexpr_function objects in recent
    # Triton (about 2 us per call on the host; a forward + backward makes about 30 of them)
    return -(-a // b)


def _np2(n: int) -> int:
    # host-side next power of 2 (n >= 1), as triton.next_power_of_2
    return 1 << (n - 1).bit_length()


@triton.jit
def _combine(a1, b1, a2, b2):
    # compose h -> a1*h + b1, then h -> a2*h + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _combine_seg(f1, q1, v1, f2, q2, v2):
    # reverse-time segments of dh_s = e_s + a_{s+1} dh_{s+1} that carry their own first decay:
    # (f, q, v) = (a at the segment's first step, product of the other steps' a, dh from e alone).
    # Scanned flipped: 1 is the later segment, 2 the earlier one it is prepended to.
    t = q2 * f1
    return f2, t * q1, v2 + t * v1


@triton.jit
def _flip0(x, INTERP: tl.constexpr):
    """tl.flip(x, 0) of a 3D tensor. Under Triton's interpreter as a tl.gather (the same permutation):
    tl.flip's xor reductions run there as a Python loop over the elements, which took most of the
    interpreted backward's time (CI runs the kernel tests under the interpreter)."""
    if INTERP:
        rev = x.shape[0] - 1 - tl.arange(0, x.shape[0])
        return tl.gather(x, tl.broadcast_to(rev[:, None, None], x.shape), 0)
    else:
        return tl.flip(x, 0)


@triton.jit
def _ex2_ftz(v):
    # 2^v as one MUFU.EX2 (denormal results flush to 0). tl.exp(v) lowers to a multiply by log2(e)
    # and ex2.approx.f32 without .ftz, which sm_90 wraps in a range test and two scaling multiplies.
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL != 0, launched with launch_pdl): wait until the kernel
    before this one in the stream has finished and its writes are visible, before any load or store of
    this kernel. The next kernel's launch then starts as this one's programs exit instead of after the
    whole kernel has completed. PDL = 2 also lets it start as soon as every program of this one has
    started (griddepcontrol.launch_dependents), for tuning: its programs then wait on the SMs."""
    if PDL != 0:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    if PDL == 2:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _decay(dA, dA2, FAST: tl.constexpr):
    """exp(delta * A) from dA = delta * A, or with FAST from dA2 = delta * A * log2(e) (fp32 on a GPU:
    one multiply and one MUFU per state element instead of five instructions). The two differ by the
    rounding of A * log2(e) (relative 2^-24 of the exponent) and by flushing results below 2^-126 to
    0, which the backward's "a > 0" test treats like an underflow."""
    if FAST:
        return _ex2_ftz(dA2)
    else:
        return tl.exp(dA)


@triton.jit
def _softplus(v):
    # log1p(z), z = exp(v), as log(w) - ((w - 1) - z) / w with w = 1 + z: the second term puts back
    # the rounding error of 1 + z (w - 1 is exact). Plain log(1 + exp(v)) has relative error
    # ~eps / exp(v): 1e-3 at v = -9 in fp32, and delta = 0 below v = -16.6 (dt_bias = -20).
    # tl has no log1p that also runs in the interpreter (libdevice calls do not).
    z = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + z
    return tl.where(v > 20.0, v, tl.log(w) - ((w - 1.0) - z) / w)


@triton.jit
def _rcp_approx(v):
    # 1 / v as one MUFU.RCP (rcp.approx.ftz: within 1 ulp); fp32 division is a MUFU.RCP plus a
    # Newton step and a range test (about 8 instructions)
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)


# _softplus_fast's polynomial: 2 atanh(s) / s ~ _SP0 + _SP1 z + _SP2 z^2 + _SP3 z^3, z = s^2 in [0, 1/9]
# (minimax in relative error with _SP0 = 2 fixed, fitted in fp64 by iteratively reweighted least squares;
# fp32-rounded): relative error 1.9e-7 at most. Degree 4 (4.5e-9) cost one more FMA per element and step
# in every pass (see _softplus_fast).
_SP0: tl.constexpr = tl.constexpr(2.0)
_SP1: tl.constexpr = tl.constexpr(0.6667348146438599)
_SP2: tl.constexpr = tl.constexpr(0.39636024832725525)
_SP3: tl.constexpr = tl.constexpr(0.3398314118385315)


@triton.jit
def _softplus_fast(v):
    """softplus for an fp32 state on a GPU, 11 instructions (two of them MUFU) instead of about 40 (the
    libdevice log, an IEEE division and exp's range test in _softplus: the largest part of the N=1
    forward's loop, offline SASS in benchmarks/RESULTS.md, session 13).

    softplus(v) = max(v, 0) + log1p(y), y = exp(-|v|) in (0, 1], and log1p(y) = 2 atanh(s) with
    s = y / (2 + y) in (0, 1/3], summed as s p(s^2) where p is the degree-3 minimax polynomial (relative
    error) of 2 atanh(s) / s over s^2 in [0, 1/9]: its error is 1.9e-7 at most (near v = 0), about three
    fp32 roundings. It replaced degree 4 (session 21; error 4.5e-9, one more FMA per element and step in
    every pass), which had replaced the Taylor series 2 (1 + s^2/3 + ... + s^12/13) of degree 6 (session
    19: forward S2 0.490 -> 0.472 ms, forward + backward S5 N=1 1.484 -> 1.46; degree 4 and the series
    gave a relative error of 2.8e-7 on average and 3.7e-6 at most over [-80, 100]).
    No branch, no cancellation: for v << 0 the result is y to a few ulp; for v >> 0 it is v plus a
    vanishing term (y = 0 past v = 87, where exp flushes to 0). The error is set by exp of a rounded
    v * log2(e), as with tl.exp (relative 4e-6 at |v| = 85, against 3e-7 of rounding alone)."""
    return _softplus_from(v, _ex2_ftz(-tl.abs(v) * LOG2E))


@triton.jit
def _softplus_from(v, y):
    """_softplus_fast's value from y = exp(-|v|)."""
    s = y * _rcp_approx(2.0 + y)
    z = s * s
    p = z * _SP3 + _SP2
    p = p * z + _SP1
    p = p * z + _SP0
    return tl.maximum(v, 0.0) + s * p


@triton.jit
def _softplus_sigmoid_fast(v):
    """(_softplus_fast(v), _sigmoid_fast(v)) from one exp(-|v|), for the gradient pass, which needs both
    at the same steps. The sigmoid used to be computed from pre at the end of the tile: Triton 3.6 then put
    its exp in another layout than the softplus's and computed it twice. Offline SASS of the N=1 loop
    (session 19): 89.7 -> 83.8 instructions per step on Triton 3.6 (still 48 MUFU.EX2 per 16 steps where
    32 would do: it now repeats the softplus's exp instead); H100 f+b S5 N=1 1.323 -> 1.313 ms."""
    y = _ex2_ftz(-tl.abs(v) * LOG2E)
    return _softplus_from(v, y), _sigmoid_from(v, y)


@triton.jit
def _sigmoid_fast(v):
    """sigmoid for an fp32 state on a GPU: 1 / (1 + y) for v >= 0, y / (1 + y) below, y = exp(-|v|)
    (no overflow; one approximate reciprocal where tl.sigmoid has an exp and an IEEE division)."""
    return _sigmoid_from(v, _ex2_ftz(-tl.abs(v) * LOG2E))


@triton.jit
def _sigmoid_from(v, y):
    r = _rcp_approx(1.0 + y)
    return tl.where(v >= 0.0, r, y * r)


@triton.jit
def _softplus_c(v, FAST: tl.constexpr):
    if FAST:
        return _softplus_fast(v)
    else:
        return _softplus(v)


@triton.jit
def _tile_raw(
    x_ptr, dt_ptr, B_ptr, route_ptr,
    b64, k, s0, L, S, K, Dm, N,
    offs_t, d, dmask, n, nmask,
    LOAD_XB: tl.constexpr = True, X_PER_ROUTE: tl.constexpr = False,
):
    """The gathers of one tile of T steps: token rows (valid, row in (b, L), row in (b, L, K)) and x,
    dt, B in their stored dtypes (x and B zeros unless LOAD_XB). Steps outside [0, S) read nothing.

    The loads stay in the stored dtype (bf16 for mixed precision); callers convert them where they
    use them, and both kernels issue all loads of a tile (C, dy, the state) at the tile's start.
    Against converting inside the load helper and loading C, dy and the state later, the kernels
    Triton 3.6 builds from this ran 15-19% faster on the H100 (benchmarks/RESULTS.md, session 9:
    forward S4 1.17 -> 0.99 ms; forward + backward S4 6.45 -> 5.22 ms, S5 N=16 8.88 -> 7.38 ms; the
    forward's early C load another 2-6%), although the offline SASS report (no shape specialization)
    shows almost the same instruction mix: the cause is not established."""
    tok = _route_tok(route_ptr, k, s0, S, offs_t)
    return _gather_tok(x_ptr, dt_ptr, B_ptr, tok, b64, k, L, K, Dm, N, d, dmask, n, nmask, LOAD_XB, X_PER_ROUTE)


@triton.jit
def _route_tok(route_ptr, k, s0, S, offs_t):
    """The tokens of route k at steps s0 + offs_t (-1 outside [0, S) and at padding steps)."""
    s = s0 + offs_t
    return tl.load(route_ptr + k * S + s, mask=(s < S) & (s >= 0), other=-1)


@triton.jit
def _token_rows(tok, b64, L, K, k):
    """valid steps, token rows in (b, L) and rows in (b, L, K) of the tokens tok, in tok's integer type:
    int64, or int32 when the host passed an int32 copy of the route (_kernel_route: every row offset
    of the launch fits 31 bits)."""
    valid = tok >= 0
    row = b64.to(tok.dtype) * L + tl.where(valid, tok, 0)
    return valid, row, row * K + k


@triton.jit
def _gather_tok(x_ptr, dt_ptr, B_ptr, tok, b64, k, L, K, Dm, N, d, dmask, n, nmask,
                LOAD_XB: tl.constexpr = True, X_PER_ROUTE: tl.constexpr = False):
    """_tile_raw's gathers for the tokens tok."""
    valid, row, rk = _token_rows(tok, b64, L, K, k)
    m2 = valid[:, None] & dmask[None, :]
    dtr = tl.load(dt_ptr + rk[:, None] * Dm + d[None, :], mask=m2, other=0.0)
    if LOAD_XB:
        if X_PER_ROUTE:
            xr = tl.load(x_ptr + rk[:, None] * Dm + d[None, :], mask=m2, other=0.0)
        else:
            xr = tl.load(x_ptr + row[:, None] * Dm + d[None, :], mask=m2, other=0.0)
        Br = tl.load(B_ptr + rk[:, None] * N + n[None, :], mask=valid[:, None] & nmask[None, :], other=0.0)
    else:
        xr = tl.zeros_like(dtr)
        Br = tl.zeros_like(dtr)
    return valid, row, rk, xr, dtr, Br


@triton.jit
def _tile_prep(s, S, dtr, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CT: tl.constexpr,
               FAST: tl.constexpr = False, FULL: tl.constexpr = False, SIG: tl.constexpr = False):
    """A tile's step mask, pre-activation (dt + bias in CT), delta and (SIG) d delta / d pre, the
    sigmoid of pre (with softplus; otherwise pre itself is returned in its place, unused); tail steps
    (s >= S) get delta = 0. FAST: _softplus_fast (fp32 on a GPU, see _decay). FULL: the tile lies inside
    [0, S) (every tile of a route whose length is a multiple of the tile, EVEN_S), so no step is masked."""
    if FULL:
        smask = tl.full(s.shape, 1, tl.int1)
    else:
        smask = s < S
    pre = dtr.to(CT)
    if HAS_BIAS:
        pre = pre + bias[None, :]
    sig = pre
    if SOFTPLUS:
        if SIG and FAST:
            delta, sig = _softplus_sigmoid_fast(pre)
        else:
            delta = _softplus_c(pre, FAST)
            if SIG:
                sig = tl.sigmoid(pre)
    else:
        delta = pre
    if not FULL:
        delta = tl.where(smask[:, None], delta, 0.0)
    return smask, pre, delta, sig


@triton.jit
def _load_tile(
    x_ptr, dt_ptr, B_ptr, route_ptr, bias,
    b64, k, s0, L, S, K, Dm, N,
    offs_t, d, dmask, n, nmask,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CT: tl.constexpr, LOAD_XB: tl.constexpr = True,
    X_PER_ROUTE: tl.constexpr = False, FAST: tl.constexpr = False,
):
    """Gather one tile of T steps: tokens, x, raw dt, delta, B. Tail steps (s >= S) get delta = 0."""
    valid, row, rk, xr, dtr, Br = _tile_raw(
        x_ptr, dt_ptr, B_ptr, route_ptr, b64, k, s0, L, S, K, Dm, N, offs_t, d, dmask, n, nmask, LOAD_XB, X_PER_ROUTE,
    )
    s = s0 + offs_t
    smask, pre, delta, _sig = _tile_prep(s, S, dtr, bias, HAS_BIAS, SOFTPLUS, CT, FAST)
    return s, smask, valid, row, rk, xr.to(CT), pre, delta, Br.to(CT)


@triton.jit
def _program_coords(k0, KL, Dm, N, BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, EVEN_D: tl.constexpr = False):
    """Decode the grid (KL * n_dblk, n_chunks, batch): the routes of one channel block are adjacent.
    EVEN_D: Dm is a multiple of BD, so the channel mask is a constant (and the masks built from it fold)."""
    pid0 = tl.program_id(0)
    pid_c = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    k = k0 + pid0 % KL
    pid_d = pid0 // KL
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    if EVEN_D:
        dmask = tl.full([BD], 1, tl.int1)
    else:
        dmask = d < Dm
    return pid_c, b64, k, pid_d, d, dmask, n, n < N, tl.arange(0, T)


@triton.jit
def _route_params(A_ptr, bias_ptr, D_ptr, k, Dm, N, d, dmask, n, nmask,
                  HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, BD: tl.constexpr, CT: tl.constexpr):
    """Route k's parameters for a channel block: A as (NP, BD), dt_bias and D as (BD,) (zeros if absent)."""
    A = tl.load(A_ptr + (k * Dm + d[None, :]) * N + n[:, None], mask=nmask[:, None] & dmask[None, :], other=0.0).to(CT)
    bias = tl.zeros([BD], dtype=CT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * Dm + d, mask=dmask, other=0.0).to(CT)
    Dv = tl.zeros([BD], dtype=CT)
    if HAS_D:
        Dv = tl.load(D_ptr + k * Dm + d, mask=dmask, other=0.0).to(CT)
    return A, bias, Dv


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr,
    out_ptr, acc_ptr, states_ptr, dsum_ptr,
    L, S, Dm, N, K, k0, KL, n_tiles, tiles_per_prog, k_pair, acc_in,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    MODE: tl.constexpr,  # 0: per-route out (b,L,K,D); 1: acc = y; 2: acc += y; 3: out = acc + y; 4: out = y;
    # 5: out (b,L,D) in its own dtype, read-add-written (written without the read in the first pass
    # of a program whose acc_in is 0): the route pairs' merge, see REPS
    PHASE: tl.constexpr,  # 0: outputs; 1: chunk-end states with zero start (for the carry pass)
    HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, CT: tl.constexpr,
    X_PER_ROUTE: tl.constexpr = False, FAST_EXP: tl.constexpr = False,
    SUB: tl.constexpr = 1,  # state slots per tile: the backward's tiles are T // SUB steps (_Cfg)
    PREFETCH: tl.constexpr = False,  # gather tile c + 1 (and load the route of c + 2) while c computes
    REPS: tl.constexpr = 1,  # 2: a route group (phase 0, MODE 5): route k0's chunk c, then (k_pair >= 0)
    # route k_pair, k0's reverse, over its chunk n_chunks - 1 - c, which visits the same tokens
    EVEN_S: tl.constexpr = False,  # S is a multiple of T: no tile has tail steps to mask (_tile_prep's FULL)
    EVEN_D: tl.constexpr = False,  # Dm is a multiple of BD: the channel mask is a constant (_program_coords)
    STAGES: tl.constexpr = 1,  # software pipelining of the tile loop (Triton's num_stages; 1: none)
    PDL: tl.constexpr = 0,  # launched with programmatic dependent launch (_pdl_start)
):
    _pdl_start(PDL)
    pid_c, b64, k, pid_d, d, dmask, n, nmask, offs_t = _program_coords(k0, KL, Dm, N, BD, NP, T, EVEN_D)
    if REPS == 1:
        _fwd_route_chunk(
            x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr, out_ptr, acc_ptr, states_ptr, dsum_ptr,
            L, S, Dm, N, K, n_tiles, tiles_per_prog, pid_c, b64, k, d, dmask, n, nmask, offs_t, acc_in != 0,
            HAS_D, HAS_BIAS, SOFTPLUS, MODE, PHASE, HAS_H0, STORE_STATES, T, BD, NP, CT,
            X_PER_ROUTE, FAST_EXP, SUB, PREFETCH, EVEN_S, STAGES,
        )
    else:
        for rep in range(0, tl.where(k_pair >= 0, 2, 1)):
            # the second route reads what other threads of this program wrote in the first
            tl.debug_barrier()
            _fwd_route_chunk(
                x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr, out_ptr, acc_ptr, states_ptr, dsum_ptr,
                L, S, Dm, N, K, n_tiles, tiles_per_prog,
                tl.where(rep == 0, pid_c, tl.cdiv(n_tiles, tiles_per_prog) - 1 - pid_c), b64,
                tl.where(rep == 0, k, k_pair), d, dmask, n, nmask, offs_t, (rep > 0) | (acc_in != 0),
                HAS_D, HAS_BIAS, SOFTPLUS, MODE, PHASE, HAS_H0, STORE_STATES, T, BD, NP, CT,
                X_PER_ROUTE, FAST_EXP, SUB, PREFETCH, EVEN_S, STAGES,
            )


@triton.jit
def _fwd_route_chunk(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr, out_ptr, acc_ptr, states_ptr, dsum_ptr,
    L, S, Dm, N, K, n_tiles, tiles_per_prog, pid_c, b64, k, d, dmask, n, nmask, offs_t, add_prev,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, MODE: tl.constexpr, PHASE: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr, T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
    CT: tl.constexpr, X_PER_ROUTE: tl.constexpr, FAST_EXP: tl.constexpr, SUB: tl.constexpr, PREFETCH: tl.constexpr,
    EVEN_S: tl.constexpr, STAGES: tl.constexpr,
):
    """_fwd_kernel's work for route k and chunk pid_c (add_prev: MODE 5 adds to what out holds)."""
    A, bias, Dv = _route_params(A_ptr, bias_ptr, D_ptr, k, Dm, N, d, dmask, n, nmask, HAS_BIAS, HAS_D, BD, CT)
    A2 = A * LOG2E
    # states: (b, K, n_slots, N, D), the state entering every T // SUB steps; tile c starts at slot c * SUB
    n_slots = tl.cdiv(S, T // SUB)
    st_base = (b64 * K + k) * n_slots
    st_off = n[:, None] * Dm + d[None, :]
    st_mask = nmask[:, None] & dmask[None, :]
    c_begin = pid_c * tiles_per_prog
    c_end = tl.minimum(c_begin + tiles_per_prog, n_tiles)
    h = tl.zeros([NP, BD], dtype=CT)
    if HAS_H0:
        h = tl.load(states_ptr + (st_base + c_begin * SUB) * N * Dm + st_off, mask=st_mask, other=0.0).to(CT)
    last = (offs_t == T - 1)[:, None, None]
    first = (offs_t == 0)[:, None, None]
    # phase 1 sums delta elementwise over its tiles and reduces over the steps once, after the loop
    # (T, 1, BD), as the decays' deltas: a (T, BD) sum kept delta in a second layout as well (the load's).
    # H100, session 19, with the backward's gacc likewise: the S2 forward's kernels 444 -> 389 us, the
    # backward's 880 -> 812 (offline, Triton 3.8 compiles the same loop length either way; pipelined, it
    # computed the softplus twice)
    dacc = tl.zeros([T, 1, BD], dtype=CT)
    if PREFETCH:
        tok_n = _route_tok(route_ptr, k, c_begin * T, S, offs_t)
        tok_nn = _route_tok(route_ptr, k, c_begin * T + T, S, offs_t)
        valid_n, _row, rk_n, x_n, dt_n, B_n = _gather_tok(x_ptr, dt_ptr, B_ptr, tok_n, b64, k, L, K, Dm, N, d, dmask, n, nmask,
                                                          True, X_PER_ROUTE)
        if PHASE == 0:
            C_n = tl.load(C_ptr + rk_n[:, None] * N + n[None, :], mask=valid_n[:, None] & nmask[None, :], other=0.0)
        else:
            C_n = B_n
    for c in tl.range(c_begin, c_end, num_stages=STAGES):
        if STORE_STATES:
            tl.store(states_ptr + (st_base + c * SUB) * N * Dm + st_off, h, mask=st_mask)
        if PREFETCH:
            tok = tok_n
            xr, dtr, Br, Cr = x_n, dt_n, B_n, C_n
            valid, row, rk = _token_rows(tok, b64, L, K, k)
            tok_n = tok_nn
            tok_nn = _route_tok(route_ptr, k, c * T + 2 * T, S, offs_t)
            valid_n, _row, rk_n, x_n, dt_n, B_n = _gather_tok(x_ptr, dt_ptr, B_ptr, tok_n, b64, k, L, K, Dm, N, d, dmask,
                                                              n, nmask, True, X_PER_ROUTE)
            if PHASE == 0:
                C_n = tl.load(C_ptr + rk_n[:, None] * N + n[None, :], mask=valid_n[:, None] & nmask[None, :], other=0.0)
            else:
                C_n = B_n
        else:
            valid, row, rk, xr, dtr, Br = _tile_raw(
                x_ptr, dt_ptr, B_ptr, route_ptr, b64, k, c * T, L, S, K, Dm, N, offs_t, d, dmask, n, nmask, True, X_PER_ROUTE,
            )
            if PHASE == 0:
                Cr = tl.load(C_ptr + rk[:, None] * N + n[None, :], mask=valid[:, None] & nmask[None, :], other=0.0)
        if PHASE == 0:
            if MODE == 5:
                # the running sum this tile adds to, loaded with the tile's other inputs (loaded where
                # it is added, and with chunks of the policy's size, the pair launches ran the S2
                # forward in 0.626 ms against 0.572 for the buffer merge; H100, session 16)
                prev = tl.load(out_ptr + row[:, None] * Dm + d[None, :], mask=valid[:, None] & dmask[None, :] & add_prev,
                               other=0.0)
        s = c * T + offs_t
        smask, pre, delta, _sig = _tile_prep(s, S, dtr, bias, HAS_BIAS, SOFTPLUS, CT, FAST_EXP, EVEN_S)
        xv = xr.to(CT)
        Bv = Br.to(CT)
        a = _decay(delta[:, None, :] * A[None, :, :], delta[:, None, :] * A2[None, :, :], FAST_EXP)  # (T, NP, BD)
        u = (delta * xv)[:, None, :] * Bv[:, :, None]
        # the carried state enters the tile's first step, so the scan's decay products go unused
        # (rather than h_all = h_loc + a_cum * h after the scan: H100 fwd S4 1.25 -> 1.16 ms)
        _a_cum, h_all = tl.associative_scan((a, tl.where(first, u + a * h[None, :, :], u)), 0, _combine)
        h = tl.sum(tl.where(last, h_all, 0.0), axis=0)
        if STORE_STATES:
            for j in tl.static_range(1, SUB):  # the states inside the tile, for the backward's shorter tiles
                hj = tl.sum(tl.where((offs_t == j * (T // SUB) - 1)[:, None, None], h_all, 0.0), axis=0)
                tl.store(states_ptr + (st_base + c * SUB + j) * N * Dm + st_off, hj,
                         mask=st_mask & (c * SUB + j < n_slots))
        if PHASE == 1:
            dacc += delta[:, None, :]
        else:
            y = tl.sum(h_all * Cr.to(CT)[:, :, None], axis=1)  # (T, BD)
            if HAS_D:
                y += Dv[None, :] * xv
            m2 = valid[:, None] & dmask[None, :]
            if MODE == 0:
                tl.store(out_ptr + rk[:, None] * Dm + d[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
            else:
                yoff = row[:, None] * Dm + d[None, :]
                if MODE == 1:
                    tl.store(acc_ptr + yoff, y, mask=m2)
                elif MODE == 2:
                    prev = tl.load(acc_ptr + yoff, mask=m2, other=0.0)
                    tl.store(acc_ptr + yoff, prev + y, mask=m2)
                elif MODE == 3:
                    prev = tl.load(acc_ptr + yoff, mask=m2, other=0.0)
                    tl.store(out_ptr + yoff, (prev + y).to(out_ptr.dtype.element_ty), mask=m2)
                elif MODE == 4:
                    tl.store(out_ptr + yoff, y.to(out_ptr.dtype.element_ty), mask=m2)
                else:
                    tl.store(out_ptr + yoff, (prev.to(CT) + y).to(out_ptr.dtype.element_ty), mask=m2)
    if PHASE == 1:
        # chunk-end state (from a zero start) and summed delta -> slot of the chunk's first tile
        tl.store(states_ptr + (st_base + c_begin * SUB) * N * Dm + st_off, h, mask=st_mask)
        tl.store(dsum_ptr + (st_base + c_begin * SUB) * Dm + d, tl.sum(tl.sum(dacc, axis=1), axis=0), mask=dmask)


@triton.jit
def _carry_kernel(
    buf_ptr, dsum_ptr, A_ptr, n_chunks, slot_stride, n_slots, Dm, N, K,
    REVERSE: tl.constexpr, BLK: tl.constexpr, CB: tl.constexpr, CT: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Carry states across chunks, in place: buf[c] <- state entering chunk c.

    Phase 1 left in slot ``c * slot_stride`` the chunk's own contribution (end state from a zero
    start, or for the reverse scan the chunk-start gradient from a zero carry) and in ``dsum`` the
    summed delta whose exp(A * dsum) carries the incoming state across the chunk.

    The recurrence h <- exp(A * dsum_c) * h + own_c is scanned CB chunks at a time
    (``tl.associative_scan`` over a [CB, BLK] tile): a chain of n_chunks dependent global loads
    (hundreds of chunks when batch x routes is small, e.g. 235 for a 64^3 volume at N=1) becomes
    n_chunks / CB rounds of independent loads.
    """
    _pdl_start(PDL)
    pid = tl.program_id(0)
    pid_bk = tl.program_id(1)
    k = pid_bk % K
    idx = pid * BLK + tl.arange(0, BLK)  # over (N, D)
    mask = idx < N * Dm
    nn = idx // Dm
    dd = idx % Dm
    A = tl.load(A_ptr + (k * Dm + dd) * N + nn, mask=mask, other=0.0).to(CT)
    base = pid_bk.to(tl.int64) * n_slots
    j = tl.arange(0, CB)
    first = (j == 0)[:, None]
    h = tl.zeros([BLK], dtype=CT)
    for i0 in range(0, n_chunks, CB):
        i = i0 + j  # processing order (chunks in reverse order for the reverse scan)
        if REVERSE:
            c = n_chunks - 1 - i
            c_next = n_chunks - 2 - i
            c0 = n_chunks - 1 - i0
        else:
            c = i
            c_next = i + 1
            c0 = i0
        m2 = (i < n_chunks)[:, None] & mask[None, :]
        slot = base + c.to(tl.int64) * slot_stride
        own = tl.load(buf_ptr + slot[:, None] * N * Dm + idx[None, :], mask=m2, other=0.0).to(CT)
        ds = tl.load(dsum_ptr + slot[:, None] * Dm + dd[None, :], mask=m2, other=0.0).to(CT)
        a = tl.exp(A[None, :] * ds)  # 1 past the last chunk (ds = 0, own = 0): h passes unchanged
        # the incoming state enters the block's first chunk; h_after[j] = state after chunk i0 + j
        _a_cum, h_after = tl.associative_scan((a, tl.where(first, own + a * h[None, :], own)), 0, _combine)
        # every thread's loads of this block are done before any slot of it is overwritten
        tl.debug_barrier()
        tl.store(buf_ptr + (base + c0.to(tl.int64) * slot_stride) * N * Dm + idx, h.to(buf_ptr.dtype.element_ty), mask=mask)
        # the state after chunk i enters chunk i + 1, which is in this block unless j = CB - 1
        m_next = ((i + 1 < n_chunks) & (j < CB - 1))[:, None] & mask[None, :]
        slot_next = base + c_next.to(tl.int64) * slot_stride
        tl.store(buf_ptr + slot_next[:, None] * N * Dm + idx[None, :], h_after.to(buf_ptr.dtype.element_ty), mask=m_next)
        h = tl.sum(tl.where((j == CB - 1)[:, None], h_after, 0.0), axis=0)
        tl.debug_barrier()  # this block's stores land before the next block's loads (its first slot)


def _carry_cfg(n_chunks: int, ND: int, rows: int = 1) -> tuple[int, int, int]:
    """(CB, BLK, num_warps) of the carry: all chunks in one round when they fit.

    The carry is a chain of n_chunks / CB dependent rounds (a global load, a scan and two stores
    each) on few programs (batch x K rows): with 32 chunks per round, S3 (683 chunks) and S5 (911)
    took 52-75 us per carry on the H100 (benchmarks/RESULTS.md, session 12), a latency chain. One
    round of many chunks on narrow column blocks (BLK of the N x D state elements) keeps the registers
    per thread where they were and multiplies the programs instead:
    - few state columns (rows x N x D < 2048: S3, S5 N=1): up to 1024 chunks a round, about 4096
      elements a program, BLK down to 4;
    - many (S2, S5 N=16): up to 512 chunks a round, about 2048 elements a program, BLK down to 8.
    H100, session 21 (kernel us, forward / backward carry; before: up to 512 chunks, 4096 elements,
    BLK >= 8 for all): S2 12.8 / 7.9 -> 10.8 / 6.0, S3 10.0 / 10.5 -> 7.5 / 7.4; S5 N=16 36.5 / 20.5 kept
    (1024 chunks: 43.3; 2048 in blocks of 2: 45.9); S5 N=1 18.8 / 9.6 -> 15.2 / 7.7 with 1024 chunks in
    blocks of 8 and 15.4 / 6.6 with 2048 in blocks of 2 (the rule's 1024 in blocks of 4 lies between).
    MAMBA_DENSE_CARRY_CB (a power of 2) overrides CB, and MAMBA_DENSE_CARRY_CFG =
    "max_CB,elements,min_BLK,max_elements_for_4_warps" the rule, for tuning."""
    env = getenv("MAMBA_DENSE_CARRY_CB")
    few = rows * ND < 2048
    rule = [1024, 4096, 4, 2048] if few else [512, 2048, 8, 2048]
    cfg = [int(v) for v in getenv("MAMBA_DENSE_CARRY_CFG", "").split(",") if v]
    max_cb, elems, min_blk, w4 = cfg + rule[len(cfg):]
    CB = int(env) if env else min(max_cb, max(2, _np2(n_chunks)))
    BLK = max(min_blk, min(128, _np2(ND), elems // CB))
    return CB, BLK, 4 if CB * BLK <= w4 else 8


def _go(site, run, fn, grid, args: tuple, meta: dict):
    """launch(fn, grid, *args, **meta), or run(site, ...) for a launch site of a cached plan (_run)."""
    if site is None:
        launch(fn, grid, *args, **meta)
    else:
        run(site, fn, grid, args, meta)


def carry(buf, dsum, A, n_chunks: int, slot_stride: int, n_slots: int, Dm: int, N: int, K: int, reverse: bool, rows: int,
          site: list | None = None, run=None, pdl: int = 0):
    """Launch the chunk carry over ``rows`` = batch x K (state rows of N x D each); see _carry_cfg.
    With a plan's launch site (site, run: see _go) the launch goes through it; pdl: see _pdl_on."""
    CB, BLK, warps = _carry_cfg(n_chunks, N * Dm, rows)
    grid = (_cdiv(N * Dm, BLK), rows)
    args = (buf, dsum, A, n_chunks, slot_stride, n_slots, Dm, N, K)
    meta = dict(REVERSE=reverse, BLK=BLK, CB=CB, CT=_ct(buf.dtype), num_warps=warps, **_pdl_meta(pdl))
    _go(site, run, _carry_kernel, grid, args, meta)


@triton.jit
def _sum_routes_kernel(buf_ptr, out_ptr, rows, K, Dm, BR: tl.constexpr, BDS: tl.constexpr, CT: tl.constexpr,
                       PDL: tl.constexpr = 0):
    """out[r, d] = sum_k buf[r, k, d] in a fixed order (deterministic), accumulated in CT."""
    _pdl_start(PDL)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.program_id(1) * BDS + tl.arange(0, BDS)
    m = (r < rows)[:, None] & (d < Dm)[None, :]
    r64 = r.to(tl.int64)
    acc = tl.zeros([BR, BDS], dtype=CT)
    for k in range(0, K):
        acc += tl.load(buf_ptr + (r64[:, None] * K + k) * Dm + d[None, :], mask=m, other=0.0).to(CT)
    tl.store(out_ptr + r64[:, None] * Dm + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


def sum_routes(buf: torch.Tensor, out_dtype: torch.dtype, site: list | None = None, run=None,
               pdl: int = 0) -> torch.Tensor:
    """(b, L, K, D) -> (b, L, D), summing the K routes in order (site, run: see _go)."""
    b, L, K, Dm = buf.shape
    out = _empty(b, L, Dm, device=buf.device, dtype=out_dtype)
    rows = b * L
    BDS = min(128, _np2(Dm))
    BR = max(1, 2048 // BDS)
    grid = (_cdiv(rows, BR), _cdiv(Dm, BDS))
    args = (buf, out, rows, K, Dm)
    meta = dict(BR=BR, BDS=BDS, CT=_ct(buf.dtype), num_warps=4, **_pdl_meta(pdl))
    _go(site, run, _sum_routes_kernel, grid, args, meta)
    return out


@triton.jit
def _sum_blocks_one(part_ptr, out_ptr, M, n_blk, BLOCK: tl.constexpr, U: tl.constexpr, CT: tl.constexpr):
    m = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    # block j's offset j * M in int64: n_blk x M passes 2^31 with many narrow blocks (e.g. batch 8,
    # 56 x 56, 4 routes, N = 256 in 96 one-channel blocks: 2.5e9) or a large volume at N = 16
    M64 = tl.cast(M, tl.int64)
    acc = tl.zeros([BLOCK], dtype=CT)
    for j0 in range(0, n_blk, U):
        for u in tl.static_range(U):
            j = j0 + u
            acc += tl.load(part_ptr + j * M64 + m, mask=mask & (j < n_blk), other=0.0).to(CT)
    tl.store(out_ptr + m, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_blocks_kernel(part_ptr, out_ptr, part2_ptr, out2_ptr, M, n_blk, BLOCK: tl.constexpr, U: tl.constexpr,
                       CT: tl.constexpr, PDL: tl.constexpr = 0):
    """out[m] = sum_j part[j, m] over the n_blk channel blocks in a fixed order, accumulated in CT;
    U blocks' loads are issued together (unrolled), the rest of the order unchanged. Programs with
    program_id(1) == 1 do the same for (part2, out2), a second sum of the same shape and dtypes
    (the backward's dB and dC in one launch)."""
    _pdl_start(PDL)
    if tl.program_id(1) == 0:
        _sum_blocks_one(part_ptr, out_ptr, M, n_blk, BLOCK, U, CT)
    else:
        _sum_blocks_one(part2_ptr, out2_ptr, M, n_blk, BLOCK, U, CT)


def sum_blocks(part: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(n_blk, *shape) -> shape in out_dtype: the channel blocks' partial sums added in one pass
    (fp32 accumulation, fp64 for fp64), without an fp32 intermediate when out_dtype is narrower.

    One-warp programs of 512 elements with 4 blocks' loads in flight: on the H100 (session 11,
    bf16 partials of segmamba_tiny) as fast as the 2048-element 4-warp loop at stages 1-2 (0.225 ms
    for 12 x 25M, 3% above the copy-rate floor) and 2x faster at stage 3 (48 x 393K: 0.028 vs 0.056)."""
    if part.shape[0] == 1 and part.dtype == out_dtype:
        return part[0]
    return _sum_blocks_launch(part, out_dtype, part)[0]


def sum_blocks2(part: torch.Tensor, out_dtype: torch.dtype, part2: torch.Tensor, out2_dtype: torch.dtype,
                site: list | None = None, run=None, pdl: int = 0):
    """sum_blocks of two partials, in one launch where they share shape and dtypes (the backward's dB
    and dC partials: one launch less per backward); two separate output tensors (site, run: see _go)."""
    if (part.shape != part2.shape or part.dtype != part2.dtype or out_dtype != out2_dtype
            or (part.shape[0] == 1 and part.dtype == out_dtype)):
        return sum_blocks(part, out_dtype), sum_blocks(part2, out2_dtype)
    return _sum_blocks_launch(part, out_dtype, part2, site, run, pdl)


def _sum_blocks_launch(part: torch.Tensor, out_dtype: torch.dtype, part2: torch.Tensor, site=None, run=None,
                       pdl: int = 0):
    """The block sums of part and, unless it is part itself, of part2 (same shape and dtype) in one
    launch: (out, out2), out2 being out for a single sum."""
    out = _empty(*part.shape[1:], device=part.device, dtype=out_dtype)
    out2 = out if part2 is part else _empty(*part.shape[1:], device=part.device, dtype=out_dtype)
    M = out.numel()
    BLOCK = 512
    _go(site, run, _sum_blocks_kernel, (_cdiv(M, BLOCK), 1 if part2 is part else 2),
        (part, out, part2, out2, M, part.shape[0]),
        dict(BLOCK=BLOCK, U=4, CT=_ct(part.dtype), num_warps=1, **_pdl_meta(pdl)))
    return out, out2


@triton.jit
def _sum_params_kernel(p_ptr, dA_ptr, dD_ptr, dbias_ptr, R, M, Dm, N, BR: tl.constexpr, BC: tl.constexpr,
                       CT: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, U: tl.constexpr = 1,
                       PDL: tl.constexpr = 0):
    """Column sums of p (R, M), M = K x (N + 2) x D, into their gradients: BR rows at a time into a
    [BR, BC] accumulator, then one fixed tree; column (k, j, d) goes to dA[k, d, j] for j < N, to
    dD[k, d] for j = N and to dbias[k, d] for j = N + 1, each in its own dtype."""
    _pdl_start(PDL)
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    cm = cols < M
    rr = tl.arange(0, BR)
    acc = tl.zeros([BR, BC], dtype=CT)
    for r0 in range(0, R, BR * U):
        # U row blocks' loads in flight at once (a program walks all R rows: a latency chain), added
        # in row order
        for u in tl.static_range(U):
            r = (r0 + u * BR + rr).to(tl.int64)
            acc += tl.load(p_ptr + r[:, None] * M + cols[None, :], mask=(r < R)[:, None] & cm[None, :], other=0.0).to(CT)
    tot = tl.sum(acc, axis=0)
    d = cols % Dm
    kj = cols // Dm
    j = kj % (N + 2)
    kd = (kj // (N + 2)) * Dm + d
    tl.store(dA_ptr + kd * N + j, _cast_for(tot, dA_ptr), mask=cm & (j < N))
    if HAS_D:
        tl.store(dD_ptr + kd, _cast_for(tot, dD_ptr), mask=cm & (j == N))
    if HAS_BIAS:
        tl.store(dbias_ptr + kd, _cast_for(tot, dbias_ptr), mask=cm & (j == N + 1))


@triton.jit
def _cast_for(v, ptr):
    """v in ptr's element dtype; narrower than fp64 through fp32 (Triton's interpreter has no
    fp64 -> bf16 cast)."""
    ty = ptr.dtype.element_ty
    if ty != tl.float64:
        v = v.to(tl.float32)
    return v.to(ty)


# row blocks whose loads sum_params issues together (1: one block at a time)
SUM_PARAMS_UNROLL = 4


def sum_params(p: torch.Tensor, K: int, N: int, Dm: int, A_dtype, D_dtype=None, bias_dtype=None, site=None, run=None,
               pdl: int = 0):
    """The backward's parameter partials p (R, K x (N + 2) x D) summed over rows in a fixed order
    (deterministic) -> dA (K, D, N) in A_dtype, and dD, dbias (K, D) in D_dtype / bias_dtype (None
    where that dtype is None). Rows of p are (batch, chunk) pairs (683 at S3).

    torch's column sum took 23-25 us for each of dA, dD and dbias at S2 / S3 on the H100
    (benchmarks/RESULTS.md, session 12); one pass over row blocks of up to 256 does all three, and
    since session 17 it also writes each gradient transposed and cast, where three torch copies
    did (about 50 us per backward under cProfile on the H100's host)."""
    R, M = p.shape
    if M != K * (N + 2) * Dm:
        raise ValueError(f"sum_params: p has {M} columns, K x (N + 2) x D = {K * (N + 2) * Dm} needed")
    dev = p.device
    dA = _empty(K, Dm, N, device=dev, dtype=A_dtype)
    dD = _empty(K, Dm, device=dev, dtype=D_dtype) if D_dtype is not None else None
    dbias = _empty(K, Dm, device=dev, dtype=bias_dtype) if bias_dtype is not None else None
    BR = min(256, max(2, _np2(R)))
    BC = max(16, 4096 // BR)
    _go(site, run, _sum_params_kernel, (_cdiv(M, BC),),
        (p, dA, dD if dD is not None else dA, dbias if dbias is not None else dA, R, M, Dm, N),
        dict(BR=BR, BC=BC, CT=_ct(p.dtype), HAS_D=dD is not None, HAS_BIAS=dbias is not None,
             U=SUM_PARAMS_UNROLL if R > BR else 1, num_warps=4, **_pdl_meta(pdl)))
    return dA, dD, dbias


def _partial_dtype(grad_dtype: torch.dtype, cdt: torch.dtype) -> torch.dtype:
    """Storage dtype of the backward's per-channel-block dB / dC partials (each a sum over BD channels
    in fp32). bf16 when the gradient itself is bf16: the partials are then rounded to the gradient's
    own precision before they are added in fp32, which halves the largest traffic of the N=16
    backward (H100, segmamba_tiny stage 1: 12 blocks x 2 x 100 MB written and read again per layer;
    benchmarks/RESULTS.md, session 10). fp32 otherwise (fp16 has too little range for partials)."""
    return torch.bfloat16 if grad_dtype == torch.bfloat16 else cdt


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_tile_raw(
    x_ptr, dt_ptr, B_ptr, C_ptr, dy_ptr, route_ptr, states_ptr, b64, k, c, st_base, L, S, K, Dm, N,
    offs_t, d, dmask, n, nmask, st_off, nd_mask, T: tl.constexpr, LOAD_XB: tl.constexpr,
    X_PER_ROUTE: tl.constexpr, DY_PER_ROUTE: tl.constexpr,
):
    """The backward's loads of tile c in their stored dtypes (see _tile_raw): token rows, x, dt, B,
    C, dy, and the state entering the tile (read only when LOAD_XB, i.e. for the gradient pass)."""
    valid, row, rk, xr, dtr, Br = _tile_raw(
        x_ptr, dt_ptr, B_ptr, route_ptr, b64, k, c * T, L, S, K, Dm, N, offs_t, d, dmask, n, nmask,
        LOAD_XB, X_PER_ROUTE,
    )
    m2 = valid[:, None] & dmask[None, :]
    Cr = tl.load(C_ptr + rk[:, None] * N + n[None, :], mask=valid[:, None] & nmask[None, :], other=0.0)
    if DY_PER_ROUTE:
        dyr = tl.load(dy_ptr + rk[:, None] * Dm + d[None, :], mask=m2, other=0.0)
    else:
        dyr = tl.load(dy_ptr + row[:, None] * Dm + d[None, :], mask=m2, other=0.0)
    if LOAD_XB:
        h0r = tl.load(states_ptr + (st_base + c) * N * Dm + st_off, mask=nd_mask, other=0.0)
    else:
        h0r = tl.zeros(nd_mask.shape, dtype=tl.float32)
    return valid, row, rk, xr, dtr, Br, Cr, dyr, h0r


@triton.jit
def _bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr, states_ptr, dy_ptr,
    dx_ptr, dxacc_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, g_ptr, gsum_ptr,
    batch, L, S, Dm, N, K, k0, KL, n_tiles, tiles_per_prog, n_chunks, k_pair, acc_in,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    DY_PER_ROUTE: tl.constexpr,  # dy is (b, L, K, D) (merge="none") instead of (b, L, D)
    DXMODE: tl.constexpr,  # 0: per-route dx (b,L,K,D); 1: acc = dx; 2: acc += dx; 3: out = acc + dx; 4: out = dx;
    # 5: dx (b,L,D) in its own dtype, read-add-written (written without the read in the first pass of a
    # program whose acc_in is 0): the route pairs' merge, see REPS and _fwd_kernel's MODE 5
    PHASE: tl.constexpr,  # 0: gradients; 1: chunk-start dh from a zero carry (for the carry pass)
    HAS_G0: tl.constexpr,  # start from the carried dh in g_ptr (chunk-parallel)
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, CT: tl.constexpr,
    X_PER_ROUTE: tl.constexpr = False,  # x is (b, L, K, D): one input per route (dx likewise)
    FAST_EXP: tl.constexpr = False,  # decays through _ex2_ftz (see _decay)
    INTERP: tl.constexpr = False,  # running under Triton's interpreter (see _flip0)
    REPS: tl.constexpr = 1,  # 2: a route group (phase 0, DXMODE 5): route k0's chunk c, then (k_pair >= 0)
    # route k_pair, k0's reverse, over its chunk n_chunks - 1 - c, which visits the same tokens
    PREV_EARLY: tl.constexpr = False,  # DXMODE 5: load the running dx sum with the tile's inputs, not at the store
    SB_ALGEBRA: tl.constexpr = False,  # the gradient pass's products through sB = sum_n dh B (see _bwd_route_chunk)
    EVEN_S: tl.constexpr = False,  # as _fwd_kernel's
    EVEN_D: tl.constexpr = False,
    STAGES: tl.constexpr = 1,
    PDL: tl.constexpr = 0,  # as _fwd_kernel's
):
    _pdl_start(PDL)
    pid_c, b64, k, pid_d, d, dmask, n, nmask, offs_t = _program_coords(k0, KL, Dm, N, BD, NP, T, EVEN_D)
    if REPS == 1:
        _bwd_route_chunk(
            x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr, states_ptr, dy_ptr,
            dx_ptr, dxacc_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, g_ptr, gsum_ptr,
            batch, L, S, Dm, N, K, n_tiles, tiles_per_prog, n_chunks, pid_c, b64, k, pid_d, d, dmask, n, nmask,
            offs_t, acc_in != 0,
            HAS_D, HAS_BIAS, SOFTPLUS, DY_PER_ROUTE, DXMODE, PHASE, HAS_G0, T, BD, NP, CT, X_PER_ROUTE, FAST_EXP,
            INTERP, PREV_EARLY, EVEN_S, STAGES, SB_ALGEBRA,
        )
    else:
        for rep in range(0, tl.where(k_pair >= 0, 2, 1)):
            # the second route reads the dx that other threads of this program wrote in the first
            tl.debug_barrier()
            _bwd_route_chunk(
                x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr, states_ptr, dy_ptr,
                dx_ptr, dxacc_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, g_ptr, gsum_ptr,
                batch, L, S, Dm, N, K, n_tiles, tiles_per_prog, n_chunks,
                tl.where(rep == 0, pid_c, n_chunks - 1 - pid_c), b64, tl.where(rep == 0, k, k_pair), pid_d, d,
                dmask, n, nmask, offs_t, (rep > 0) | (acc_in != 0),
                HAS_D, HAS_BIAS, SOFTPLUS, DY_PER_ROUTE, DXMODE, PHASE, HAS_G0, T, BD, NP, CT, X_PER_ROUTE, FAST_EXP,
                INTERP, PREV_EARLY, EVEN_S, STAGES, SB_ALGEBRA,
            )


@triton.jit
def _bwd_route_chunk(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr, states_ptr, dy_ptr,
    dx_ptr, dxacc_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, g_ptr, gsum_ptr,
    batch, L, S, Dm, N, K, n_tiles, tiles_per_prog, n_chunks, pid_c, b64, k, pid_d, d, dmask, n, nmask,
    offs_t, add_prev,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DY_PER_ROUTE: tl.constexpr,
    DXMODE: tl.constexpr, PHASE: tl.constexpr, HAS_G0: tl.constexpr, T: tl.constexpr, BD: tl.constexpr,
    NP: tl.constexpr, CT: tl.constexpr, X_PER_ROUTE: tl.constexpr, FAST_EXP: tl.constexpr, INTERP: tl.constexpr,
    PREV_EARLY: tl.constexpr, EVEN_S: tl.constexpr, STAGES: tl.constexpr, SB_ALGEBRA: tl.constexpr = False,
):
    """_bwd_kernel's work for route k and chunk pid_c (add_prev: DXMODE 5 adds to what dx holds)."""
    nd_mask = nmask[:, None] & dmask[None, :]
    A, bias, Dv = _route_params(A_ptr, bias_ptr, D_ptr, k, Dm, N, d, dmask, n, nmask, HAS_BIAS, HAS_D, BD, CT)
    A2 = A * LOG2E
    st_base = (b64 * K + k) * n_tiles
    st_off = n[:, None] * Dm + d[None, :]
    g_slot = (b64 * K + k) * n_chunks + pid_c  # (b, K, n_chunks, ...) buffers
    first = (offs_t == 0)[:, None, None]
    last = (offs_t == T - 1)[:, None, None]
    g = tl.zeros([NP, BD], dtype=CT)  # dL/dh at the step after the current tile
    if HAS_G0:
        g = tl.load(g_ptr + g_slot * N * Dm + st_off, mask=nd_mask, other=0.0).to(CT)
    dA_acc = tl.zeros([NP, BD], dtype=CT)
    # dD and dbias summed over each tile's two halves of steps and across tiles, and over the halves' steps
    # once after the loop: in the layout the loads give these tiles (steps across 8 lanes, two per
    # lane) a per-tile step sum took 3 shuffle rounds per value (72 SHFL of the N = 1 loop, offline)
    tl.static_assert(T % 2 == 0, "backward tiles of an even number of steps")
    dD_acc = tl.zeros([T // 2, BD], dtype=CT)
    dbias_acc = tl.zeros([T // 2, BD], dtype=CT)
    # phase 1: deltas summed elementwise, reduced once at the end, and the last tile's (c_begin's); (T, 1, BD)
    # as the decays' deltas, so that delta is needed in one layout only (see _fwd_route_chunk's dacc)
    gacc = tl.zeros([T, 1, BD], dtype=CT)
    dlast = tl.zeros([T, 1, BD], dtype=CT)
    c_begin = pid_c * tiles_per_prog
    c_end = tl.minimum(c_begin + tiles_per_prog, n_tiles)
    first2 = (offs_t == 0)[:, None]
    # The reverse scan needs a_{s+1}. It is taken from the tile's own decays: a reverse scan of
    # segments that carry their first step's decay (_combine_seg), and across tiles gA = a * g of the
    # later tile's first step. (A second load of every tile shifted by one step, exponentiated again,
    # cost more: H100 f+b S1 2.17 -> 1.90 ms, S4 8.40 -> 7.87, S5 N16 12.91 -> 11.75 without it.)
    # delta and decay at the step after this program's last tile (0 and 1 past the route's end):
    _s0, _sm0, _v0, _r0, _rk0, _x0, _p0, delta_nx, _B0 = _load_tile(
        x_ptr, dt_ptr, B_ptr, route_ptr, bias, b64, k, c_end * T, L, S, K, Dm, N,
        offs_t, d, dmask, n, nmask, HAS_BIAS, SOFTPLUS, CT, False, False, FAST_EXP,
    )
    d_next = tl.sum(tl.where(first2, delta_nx, 0.0), axis=0)
    gA = tl.exp(d_next[None, :] * A) * g  # a_{next step} * dh_{next step}
    for ci in tl.range(c_begin, c_end, num_stages=STAGES):
        c = c_end - 1 - (ci - c_begin)
        valid, row, rk, xr, dtr, Br, Cr, dyr, h0r = _bwd_tile_raw(
            x_ptr, dt_ptr, B_ptr, C_ptr, dy_ptr, route_ptr, states_ptr, b64, k, c, st_base, L, S, K, Dm, N,
            offs_t, d, dmask, n, nmask, st_off, nd_mask, T, PHASE == 0, X_PER_ROUTE, DY_PER_ROUTE,
        )
        if PHASE == 0:
            if DXMODE == 5:
                if PREV_EARLY:
                    prev = tl.load(dx_ptr + row[:, None] * Dm + d[None, :],
                                   mask=valid[:, None] & dmask[None, :] & add_prev, other=0.0)
        s = c * T + offs_t
        smask, pre, delta, sig = _tile_prep(s, S, dtr, bias, HAS_BIAS, SOFTPLUS, CT, FAST_EXP, EVEN_S, PHASE == 0)
        xv = xr.to(CT)
        Bv = Br.to(CT)
        Cv = Cr.to(CT)
        dyv = dyr.to(CT)
        m2 = valid[:, None] & dmask[None, :]
        # reverse scan: dh_s = C_s dy_s + a_{s+1} dh_{s+1}, with dh after the tile = g
        e = Cv[:, :, None] * dyv[:, None, :]
        # reverse scans as flip -> forward scan -> flip: with the step axis inside each thread the
        # flips are register renames, whereas Triton lowers reverse=True with a 5-shuffle lane
        # reversal of every input and output value (640 SHFL of the 2976 SASS instructions at N=16)
        a = _decay(delta[:, None, :] * A[None, :, :], delta[:, None, :] * A2[None, :, :], FAST_EXP)
        # a_{s+1} dh_{s+1} after the tile enters its last step, so the scan's decay products go
        # unused (rather than dh = v + qa * gA after the scan)
        e = tl.where(last, e + gA[None, :, :], e)
        _f, _qa, v = tl.associative_scan(
            (_flip0(a, INTERP), tl.full([T, NP, BD], 1.0, CT), _flip0(e, INTERP)), 0, _combine_seg
        )
        dh = _flip0(v, INTERP)
        if PHASE == 1:
            g = tl.sum(tl.where(first, dh, 0.0), axis=0)
            gA = tl.sum(tl.where(first, a, 0.0), axis=0) * g
            # summed over the program (the first step of c_begin's tile taken out after the loop)
            gacc += delta[:, None, :]
            dlast = delta[:, None, :]
        else:
            # only a_s dh_s of the tile's first step is carried: one reduction instead of two
            # (dh there, then a times it; the same single product, bit for bit)
            gA = tl.sum(tl.where(first, a * dh, 0.0), axis=0)
            # recompute forward states of this tile
            h0 = h0r.to(CT)
            if SB_ALGEBRA:
                dxd = delta * xv  # delta_s x_s (T, BD)
                u = Bv[:, :, None] * dxd[:, None, :]
            else:
                bx = Bv[:, :, None] * xv[:, None, :]  # B_s x_s (T, NP, BD)
                u = delta[:, None, :] * bx
            _a_cum, h_all = tl.associative_scan((a, tl.where(first, u + a * h0[None, :, :], u)), 0, _combine)
            # a_s * h_{s-1}, exactly 0 where a_s underflows. The GPU contracts h_all - u (u a product)
            # into an FMA, which leaves the rounding error of u instead of 0 (eps |u|; times A = -1e4
            # at delta = 1e4, an error of ~10 in ddelta). Where a_s > 0, |delta A| < 104 bounds that
            # error of A * hprev_a by 104 eps |bx|.
            hprev_a = tl.where(a > 0.0, h_all - u, 0.0)
            if SB_ALGEBRA:
                # sB = sum_n dh B serves both dx = delta sB + D dy and ddelta's B x term (x sB), and
                # w = dh a h_{s-1} both ddelta's A term and dA: 3 multiplies per element fewer than
                # the products below (gd = dh delta, gd B, A hprev_a + bx, dh * that, dh hprev_a delta)
                sB = tl.sum(dh * Bv[:, :, None], axis=1)
                w = dh * hprev_a
                dxv = delta * sB + Dv[None, :] * dyv
                ddelta = tl.sum(A[None, :, :] * w, axis=1) + xv * sB
                dA_acc += tl.sum(w * delta[:, None, :], axis=0)
                gx = dxd  # dB = sum_d dh delta x
                gh = dh
            else:
                gd = dh * delta[:, None, :]
                dxv = tl.sum(gd * Bv[:, :, None], axis=1) + Dv[None, :] * dyv
                ddelta = tl.sum(dh * (A[None, :, :] * hprev_a + bx), axis=1)
                dA_acc += tl.sum(dh * hprev_a * delta[:, None, :], axis=0)
                gx = xv
                gh = gd
            if NP == 1 and BD == 32:
                # as (T, BD) products: Triton then forms them in the layout x and dy are loaded in (8
                # channels per thread, 4 lanes per step) and sums in registers and over 2 lane rounds,
                # where the (T, 1, BD) form summed each step over all 32 lanes (5 shuffle rounds: 160
                # shuffles and 160 adds of the N = 1 loop's 1580 instructions, offline SASS). H100,
                # session 19, f+b kernel ms: S2 1.458 -> 1.378, S3 0.417 -> 0.398; with blocks of 16 it
                # lost badly (S1 1.10 -> 1.78, S5 N=1 1.39 -> 1.90), so those keep the (T, 1, BD) form
                dBv = tl.sum(tl.reshape(gh, [T, BD]) * gx, axis=1)[:, None]  # (T, 1)
                dCv = tl.sum(tl.reshape(h_all, [T, BD]) * dyv, axis=1)[:, None]
            else:
                dBv = tl.sum(gh * gx[:, None, :], axis=2)  # (T, NP)
                dCv = tl.sum(h_all * dyv[:, None, :], axis=2)
            if HAS_D:
                dD_acc += tl.sum(tl.reshape(dyv * xv, [2, T // 2, BD]), axis=0)
            if SOFTPLUS:
                dpre = ddelta * sig
            else:
                dpre = ddelta
            dpre = tl.where(smask[:, None] & dmask[None, :], dpre, 0.0)
            if HAS_BIAS:
                dbias_acc += tl.sum(tl.reshape(dpre, [2, T // 2, BD]), axis=0)
            tl.store(ddt_ptr + rk[:, None] * Dm + d[None, :], dpre.to(ddt_ptr.dtype.element_ty), mask=m2)
            # dB, dC partials per channel block: (n_dblk, b, L, K, N)
            bc_off = rk[:, None] * N + n[None, :]
            bc_base = pid_d.to(tl.int64) * batch * L * K * N
            bc_mask = valid[:, None] & nmask[None, :]
            tl.store(dB_ptr + bc_base + bc_off, dBv.to(dB_ptr.dtype.element_ty), mask=bc_mask)
            tl.store(dC_ptr + bc_base + bc_off, dCv.to(dC_ptr.dtype.element_ty), mask=bc_mask)
            xoff = row[:, None] * Dm + d[None, :]
            if DXMODE == 0:
                tl.store(dx_ptr + rk[:, None] * Dm + d[None, :], dxv.to(dx_ptr.dtype.element_ty), mask=m2)
            elif DXMODE == 1:
                tl.store(dxacc_ptr + xoff, dxv, mask=m2)
            elif DXMODE == 2:
                prev = tl.load(dxacc_ptr + xoff, mask=m2, other=0.0)
                tl.store(dxacc_ptr + xoff, prev + dxv, mask=m2)
            elif DXMODE == 3:
                prev = tl.load(dxacc_ptr + xoff, mask=m2, other=0.0)
                tl.store(dx_ptr + xoff, (prev + dxv).to(dx_ptr.dtype.element_ty), mask=m2)
            elif DXMODE == 4:
                tl.store(dx_ptr + xoff, dxv.to(dx_ptr.dtype.element_ty), mask=m2)
            else:
                if not PREV_EARLY:
                    prev = tl.load(dx_ptr + xoff, mask=m2 & add_prev, other=0.0)
                tl.store(dx_ptr + xoff, (prev.to(CT) + dxv).to(dx_ptr.dtype.element_ty), mask=m2)
    if PHASE == 1:
        tl.store(g_ptr + g_slot * N * Dm + st_off, g, mask=nd_mask)
        # the deltas of steps c_begin*T + 1 ... c_end*T: all of the walked tiles' but the first step's,
        # which is taken out once here (a select per element and tile cost 0.6 of the loop's 37
        # instructions per step, offline SASS), and the next chunk's first
        tl.store(gsum_ptr + g_slot * Dm + d,
                 tl.sum(tl.sum(gacc, axis=1), axis=0) - tl.sum(tl.sum(tl.where(first, dlast, 0.0), axis=1), axis=0)
                 + d_next,
                 mask=dmask)
    else:
        # per (b, chunk, k) partial parameter gradients in one buffer (b, n_chunks, K, N + 2, D):
        # rows 0..N-1 dA, row N dD, row N + 1 dbias (summed over (b, chunk) by one sum_params pass)
        pk = ((b64 * n_chunks + pid_c) * K + k) * (N + 2) * Dm
        tl.store(dA_ptr + pk + st_off, dA_acc, mask=nd_mask)
        if HAS_D:
            tl.store(dD_ptr + pk + N * Dm + d, tl.sum(dD_acc, axis=0), mask=dmask)
        if HAS_BIAS:
            tl.store(dbias_ptr + pk + (N + 1) * Dm + d, tl.sum(dbias_acc, axis=0), mask=dmask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

_ROUTE_INFO: dict = {}


def on_device(t: torch.Tensor):
    """Context for launching kernels on t's GPU: Triton launches on the current CUDA device, which
    need not be t's (a model on cuda:1 while cuda:0 is current). A no-op (no device call at all,
    e.g. inside a CUDA-graph capture) when t is on the CPU or already on the current device."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _empty(*shape, device, dtype) -> torch.Tensor:
    """torch.empty, filled with NaN when MAMBA_DENSE_POISON=1 (tests catch unwritten elements)."""
    t = torch.empty(*shape, device=device, dtype=dtype)
    if getenv("MAMBA_DENSE_POISON", "0") == "1":
        t.fill_(float("nan"))
    return t


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return _empty(*t.shape, device=t.device, dtype=t.dtype)


def fwd_buffers(batch, K, n_tiles, N, Dm, dev, cdt, need_states: bool, D, dt_bias):
    """The forward's state buffer (b, K, n_tiles, N, D) (or a 1-element dummy when no state is
    stored) and the D / dt_bias pointers (the dummy when absent; the kernels never read it then)."""
    states = _empty(batch, K, n_tiles, N, Dm, device=dev, dtype=cdt) if need_states else _empty(1, device=dev, dtype=cdt)
    return states, (D if D is not None else states), (dt_bias if dt_bias is not None else states)


def _route_info(route: torch.Tensor, what, compute, capturing):
    """compute(), a fact about the route tensor that needs a sync, cached per (what, route tensor),
    holding the route weakly (routes.cache_put). Under CUDA-graph capture the sync is forbidden:
    capturing() is returned instead, uncached."""
    key = _routes.tensor_key(route, what)
    hit = _routes.cache_get(_ROUTE_INFO, key, route)
    if hit is not None:
        return hit
    if route.is_cuda and torch.cuda.is_current_stream_capturing():
        return capturing()
    return _routes.cache_put(_ROUTE_INFO, key, route, compute(), limit=1024)


def _kernel_route(route: torch.Tensor, rows: int) -> torch.Tensor:
    """The route the scan kernels read: an int32 copy (cached per route tensor, like route_coverage)
    when every token-row offset of the launch, rows = batch * L * K * max(Dm, N), fits 31 bits; the
    kernels then compute their row offsets in int32 (_token_rows), else from the int64 route.
    MAMBA_DENSE_SCAN_I64=1 keeps int64 (for comparisons)."""
    if rows >= 2**31 or getenv("MAMBA_DENSE_SCAN_I64") == "1":
        return route
    return _route_info(route, "int32", lambda: route.to(torch.int32), lambda: route.to(torch.int32))


def route_coverage(route: torch.Tensor, L: int) -> tuple[bool, ...]:
    """Per route: does it visit every one of the L tokens? Cached per route tensor (one sync).

    Under CUDA graph capture (torch.compile mode="reduce-overhead" copies graph inputs into static
    buffers, so the route is a tensor not seen before) the sync is forbidden: every route reports
    "not covered", which makes the callers zero-fill their outputs. That is correct for every route,
    at the cost of a memset in the captured graph.
    """
    def compute():
        # routes visit each token at most once (checked by the route builders), so count == L <=> cover
        return tuple(bool(v) for v in ((route >= 0).sum(1) == L).tolist())

    return _route_info(route, ("coverage", L), compute, lambda: (False,) * route.shape[0])


def route_groups(route: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """The routes as merge groups: (k, k2) where route k2 is route k reversed (cross2d's 0/2 and
    1/3, segmamba3d's 0/1, Vim's two directions), (k,) for the others. Cached per route tensor
    (one sync); under CUDA-graph capture (no sync allowed) every route is its own group."""
    K = route.shape[0]
    singles = lambda: tuple((k,) for k in range(K))  # noqa: E731

    def compute():
        if K < 2:
            return singles()
        cand = [(i, j) for i in range(K) for j in range(i + 1, K)]
        rev = route.flip(1)
        same = torch.stack([(route[i] == rev[j]).all() for i, j in cand]).tolist()
        groups, used = [], set()
        for k in range(K):
            if k in used:
                continue
            mate = next((j for (i, j), ok in zip(cand, same) if ok and i == k and j not in used), None)
            groups.append((k,) if mate is None else (k, mate))
            used.update(groups[-1])
        return tuple(groups)

    return _route_info(route, "groups", compute, singles)


def _pair_tiles(n_tiles: int, tpc: int) -> int | None:
    """Tiles per chunk for the pair merge: the divisor of n_tiles (so a reversed route's mirrored
    chunks cover the same tokens) nearest tpc, within a factor 2 of it, leaving at least 2 chunks."""
    best = None
    for t in range(max(1, -(-tpc // 2)), min(2 * tpc, n_tiles // 2) + 1):
        if n_tiles % t == 0 and (best is None or abs(math.log(t / tpc)) < abs(math.log(best / tpc))):
            best = t
    return best


def _pairable(route, merge: str, x_per_route: bool, cover, S: int, T: int, odt: torch.dtype, N: int) -> bool:
    """Whether a chunk-parallel launch of this call could merge its routes by reversed pairs
    (_pair_plan's conditions besides the chunking itself)."""
    if (merge != "sum" or x_per_route or _merge_strategy() != "pairs" or S % T or N > PAIR_MAX_N
            or not all(cover) or odt not in (torch.bfloat16, torch.float32, torch.float64)):
        return False
    return any(len(g) == 2 for g in route_groups(route))


def _pair_plan(route, merge: str, x_per_route: bool, cover, S: int, T: int, n_tiles: int, tpc: int,
               odt: torch.dtype, N: int, exact: bool = False, div: int | None = None):
    """(groups, tiles per chunk) when a chunk-parallel forward merges its routes by reversed pairs
    (_fwd_kernel's REPS), else None.

    Each program then walks route k's chunk c and route k2's chunk n_chunks - 1 - c: the same tokens,
    so the pair's outputs are summed in place before any other route adds to them, group after
    group (one launch each), in the output dtype. That writes the output once per group instead of
    writing K per-route planes and reading them back (merge "buffer"). Needs: merge "sum", one x
    for all routes, routes that cover every token, a reversed pair, S a multiple of the tile, the
    output in bf16 / fp32 / fp64 (an fp16 running sum could overflow where the total does not) and
    N <= PAIR_MAX_N.
    MAMBA_DENSE_MERGE=buffer / serial turns it off. exact (a tiles_per_chunk override): tpc itself or
    nothing."""
    if tpc >= n_tiles or not _pairable(route, merge, x_per_route, cover, S, T, odt, N):
        return None
    groups = route_groups(route)
    div = PAIR_CHUNK_DIV if div is None else div
    t = (tpc if n_tiles % tpc == 0 else None) if exact else _pair_tiles(n_tiles, max(2, tpc // div))
    return None if t is None or n_tiles // t > MAX_GRID_YZ else (groups, t)


# a pair program walks two chunks: the pair plan aims at chunks of max(2, the policy's tiles //
# PAIR_CHUNK_DIV) tiles. H100, session 16, in-place pair forward, kernel ms at 1 / 2 / 3 / 4:
# S2 0.585 / 0.533 / 0.499 / 0.533 (8 / 4 / 2 / 1 tiles per chunk), S3 0.142 at 2 tiles against
# 0.157 at 1, S5 N=1 0.496 / 0.475 / 0.476 / 0.491 (8 / 4 / 4 / 2 tiles). With 3 (call 6): S2 0.572
# -> 0.499, S3 0.169 -> 0.142, S5 N=1 0.537 -> 0.476 against the buffer merge
PAIR_CHUNK_DIV = int(os.environ.get("MAMBA_DENSE_PAIR_CHUNK_DIV", "3"))
# the pair merge for N <= PAIR_MAX_N only. H100, session 16 (call 3, chunks of tpc // 2), kernel ms, buffer -> pairs, forward /
# forward + backward: S2 0.572 -> 0.534 / 1.752 -> 1.708, S3 0.170 -> 0.158 / 0.546 -> 0.533, S5 N=1
# 0.538 -> 0.477 / 1.671 -> 1.606; but S5 N=16 1.456 -> 1.436 / 5.60 -> 5.78 (with the backward's
# states stored, its pair launches took 811 + 337 us against 934 + 81 us)
PAIR_MAX_N = 1


class _Cfg(NamedTuple):
    """Tile configuration of one (N, Dm, dtype); see _config."""

    T: int  # steps per backward tile = steps between the saved states
    BDf: int  # forward channel block (widened for chunk-parallel N=1 launches, _wide_block)
    BDb: int  # backward channel block (likewise)
    warps: int
    Tf: int  # steps per forward tile, a multiple of T (the forward saves Tf // T states per tile)
    warps_b: int = 0  # warps of the backward's programs (0: warps)


def _config(N: int, Dm: int, dtype: torch.dtype) -> _Cfg:
    """Tiles, channel blocks and warps for a state size.

    The backward walks tiles of T steps from the states the forward saved every T steps; the forward
    may walk longer tiles (Tf, a multiple of T) and save Tf // T states per tile. Chosen from the H100
    sweeps in benchmarks/RESULTS.md (benchmarks/scan_tune.py): one warp per program and small tiles
    keep registers low enough for useful occupancy. For N = 1 the forward is fastest on 32-step tiles
    and the backward on 16-step tiles (session 14, H100, kernel time of the backward: S1 1.09 -> 0.84
    ms, S2 1.37 -> 1.16 ms with blocks of 32, _wide_block; the forward on 16-step tiles was slower, S1
    0.33 -> 0.48).
    MAMBA_DENSE_SCAN_CFG="T,BD,warps", "T,BDf,BDb,warps" (Tf = T), "Tf,T,BDf,BDb,warps" or
    "Tf,T,BDf,BDb,warps,backward warps" overrides (for tuning).
    """
    NP = _np2(N)
    env = getenv("MAMBA_DENSE_SCAN_CFG")
    if env:
        vals = [int(v) for v in env.split(",")]
        if len(vals) == 3:
            return _Cfg(vals[0], vals[1], vals[1], vals[2], vals[0])
        if len(vals) == 4:
            return _Cfg(vals[0], vals[1], vals[2], vals[3], vals[0])
        Tf, T, BDf, BDb, warps, *wb = vals
        if Tf % T:
            raise ValueError(f"MAMBA_DENSE_SCAN_CFG: the forward tile {Tf} must be a multiple of the backward tile {T}")
        return _Cfg(T, BDf, BDb, warps, Tf, *wb[:1])
    # Above 16 states a tile keeps about the elements per thread of N = 16's: the forward's channel
    # blocks shrink to 16 x 16 / NP channels (one warp); the backward's are 8 channels for NP = 32 and
    # 4 above, on NP / 32 warps. With N = 16's tiles, N = 64 spilled 10 kB a thread in the backward
    # (offline, Triton 3.8) and N = 128 took 20.6 / 74.8 ms (forward / forward + backward) where this
    # takes 0.88 / 8.7; one-warp backward blocks of 8 x 16 / NP channels made dB / dC partials of up
    # to 11 GB at N = 256 (H100, benchmarks/scan_state_sizes.py, session 24).
    wide = max(1, NP // 16)
    if dtype == torch.float64:
        return _Cfg(16, max(1, 16 // wide), max(1, 16 // wide), 4, 16)
    cap = max(8, _np2(Dm))
    if NP == 1:
        return _Cfg(16, min(16, cap), min(16, cap), 1, 32)
    if NP <= 4:
        T, BDf, BDb = 16, 16, 16
    elif NP <= 16:
        T, BDf, BDb = 8, 16, 8
    else:
        T, BDf, BDb = 8, max(1, 16 // wide), 8 if NP == 32 else 4
    return _Cfg(T, min(BDf, cap), min(BDb, cap), 1, T, max(1, NP // 32))


def _wide_block(N: int, Dm: int, dtype: torch.dtype, chunked: bool) -> bool:
    """Channel blocks of 32 instead of 16 for N = 1 launches (forward or backward) that run
    chunk-parallel anyway, when Dm is a multiple of 32; the chunking makes up the halved program count.

    Forward: a token row of 16 bf16 channels is one 32-byte sector, so the gathers of a [T, 16] tile
    touch T lines for 32 bytes each, and the output pass was bound by the L1 (Nsight Compute, S2
    output pass: L1/TEX 88% busy, DRAM 31%; benchmarks/RESULTS.md, session 13). H200, same call: S2
    forward 0.608 -> 0.535 ms. Backward (16-step tiles, session 14, H100, kernel time of the
    backward): S2 1.37 -> 1.16 ms, S3 0.41 -> 0.37. Launches that fill the GPU without chunks keep 16
    (S1 forward 0.295 -> 0.349 ms with 32; S1 backward 0.84 ms with 16 against 0.88). Not with
    MAMBA_DENSE_SCAN_CFG set (tuning), nor for fp64."""
    return (chunked and _np2(N) == 1 and Dm % 32 == 0 and dtype != torch.float64
            and not getenv("MAMBA_DENSE_SCAN_CFG"))


# Register caps (ptxas maxnreg) per (kind, phase, NP, T, BD, warps, forward prefetch); phase 1 is the
# chunk-end pass, 0 the other. H100, Triton 3.6, kernel ms (benchmarks/RESULTS.md, sessions 7 and 20):
# - the N=16 backward's gradient pass (255 registers uncapped): 168 gives 12 one-warp programs per SM,
#   S4 f+b 7.69 -> 6.38 ms, S5 N=16 10.07 -> 9.67 (session 7; 152 / 184 / 128 slower); its phase-1 pass
#   runs better uncapped (session 20: S5 N=16 f+b 5.20 -> 5.12-5.15 with the forward caps below);
# - the N=16 forward (session 20, S5 N=16 forward 1.38-1.39 -> 1.25-1.26 with both caps; S4, one pass,
#   level): the output pass at 128 (1.29 alone; 144 1.39, 112 1.34), phase 1 at 96;
# - the one-pass N=1 forward with its prefetch (blocks of 16, S1) at 112: 0.315 -> 0.307-0.308 (96:
#   0.313);
# - the chunked N=1 forwards (S2, S3 in channel blocks of 32, S5 N=1 in blocks of 16): phase 1 at 96, the
#   output pass at 152 (session 21, with the degree-3 softplus polynomial, two alternations: S2 0.394-0.395
#   -> 0.386-0.387, S3 0.113-0.114 -> 0.112-0.113, S5 N=1 0.412 -> 0.403; phase 1 alone at 96: S2 0.388,
#   S5 N=1 level; at 88 / 104 / 112: S2 0.399 / 0.397 / 0.397; with phase 1 at 96, the output pass at
#   128 / 136 / 144 / 160: S2 0.386 / 0.387 / 0.389 / 0.388, S5 N=1 0.416 / 0.416 / 0.403-0.405 / 0.405).
#   Session 20 (degree-4 polynomial) had found them level or slower with the caps it tried (output
#   pass 112 / 96: S2 0.401 -> 0.408 / 0.522; phase 1 96 / 80: S2 0.397 / 0.474). One-pass N=1 forwards
#   with the prefetch turned off (MAMBA_DENSE_FWD_PREFETCH=0) share the blocks-of-16 output key;
# - the N=1 backward (250 registers) gained nothing from a cap.
_REG_CAPS = {
    ("bwd", 0, 16, 8, 8, 1, False): 168,
    ("fwd", 0, 16, 8, 16, 1, False): 128,
    ("fwd", 1, 16, 8, 16, 1, False): 96,
    ("fwd", 0, 1, 32, 16, 1, True): 112,
    ("fwd", 1, 1, 32, 32, 1, False): 96,
    ("fwd", 0, 1, 32, 32, 1, False): 152,
    ("fwd", 1, 1, 32, 16, 1, False): 96,
    ("fwd", 0, 1, 32, 16, 1, False): 152,
}


def _reg_cap(kind: str, NP: int, T: int, BD: int, warps: int, phase: int = 0, prefetch: bool = False) -> dict:
    """Launch option capping the registers per thread of the forward ("fwd") or backward ("bwd")
    kernel of a phase (1: the chunk-end pass; 0: the output / gradient pass); see _REG_CAPS.
    MAMBA_DENSE_SCAN_MAXNREG="fwd_cap,bwd_cap" or, per phase, "fwd1,fwd0,bwd1,bwd0" (0 = no cap)
    overrides, for tuning."""
    env = getenv("MAMBA_DENSE_SCAN_MAXNREG")
    if env:
        caps = [int(v) for v in env.split(",")]
        if len(caps) == 2:
            cap = caps[0] if kind == "fwd" else caps[1]
        else:
            cap = caps[(0 if kind == "fwd" else 2) + (0 if phase == 1 else 1)]
    else:
        cap = _REG_CAPS.get((kind, phase, NP, T, BD, warps, prefetch))
    return {"maxnreg": cap} if cap else {}


def _fwd_prefetch(NP: int, chunked: bool, phase: int = 0) -> bool:
    """Whether the forward gathers its next tile (and loads the route of the one after) while the
    current tile computes (_fwd_kernel's PREFETCH): for one-pass N = 1 launches. H100, kernel time,
    two alternations (benchmarks/RESULTS.md, session 15): forward S1 0.324 -> 0.317 ms; the
    chunk-parallel launches lose (S2 0.571 -> 0.597, S3 0.169 -> 0.184, S5 N1 0.538 -> 0.546: the
    phase-1 kernel goes from 154 to 210 registers). Session 8 found N = 16 spilling with a prefetch.
    MAMBA_DENSE_FWD_PREFETCH=0/1 overrides (every launch of any N), or per phase "p1,p0" (phase 1: the
    chunk-end pass; 0: the output pass)."""
    env = getenv("MAMBA_DENSE_FWD_PREFETCH")
    if env is not None:
        vals = env.split(",")
        return (vals[0] if len(vals) == 1 or phase == 1 else vals[1]) == "1"
    return NP == 1 and not chunked and phase == 0


# the folds each kernel takes (H100, session 19, kernel ms, forward / forward + backward; none -> these):
# S2 0.471 / 1.505 -> 0.457 / 1.454, S3 0.135 / 0.418 -> 0.131 / 0.418, S5 N=1 0.450 / 1.463 -> 0.448 / 1.396
# (with the backward's half-tile dD / dbias sums). The forward's channel fold is left out: S5 N=1 (blocks
# of 16) ran its forward in 0.467 ms with it, S2 and S3 gained nothing from it.
EVEN_FLAGS = ("fwdS", "bwdS", "bwdD")


def _even(kind: str, S: int, T: int, Dm: int, BD: int) -> dict:
    """The kernels' EVEN_S / EVEN_D: whether every tile is whole (S a multiple of T) and every channel
    block full (Dm a multiple of BD), so that their step and channel masks fold to constants. Offline
    (Triton 3.8, N=1, T 32 / 16, blocks of 32) that removes 3-4% of the forward's and the backward's first
    pass's instructions. Which kernel takes which: EVEN_FLAGS, or MAMBA_DENSE_SCAN_EVEN (for comparisons),
    a comma-separated subset of fwdS, fwdD, bwdS, bwdD ("" for none)."""
    allow = getenv("MAMBA_DENSE_SCAN_EVEN")
    allow = EVEN_FLAGS if allow is None else allow.split(",")
    return dict(EVEN_S=kind + "S" in allow and S % T == 0, EVEN_D=kind + "D" in allow and Dm % BD == 0)


# Triton's software pipelining (num_stages) of the tile loops of: the forward's phase 1, the forward's
# output pass, the backward's phase 1, the backward's gradient pass (1: none). Pipelined, the gathers go
# through cp.async into shared memory, but H100 (session 19, kernel ms) found no gain worth taking: the
# forward at 2 stages S2 0.402 -> 0.438, S5 N=1 0.413 -> 0.425; the backward's phase 1 at 2 S2 f+b 1.255
# -> 1.268 (S5 N=16 5.29 -> 5.19); its gradient pass at 2 S2 1.255 -> 1.435 (Triton computes the softplus
# there in two layouts). So none by default; MAMBA_DENSE_SCAN_STAGES for tuning.
SCAN_STAGES = (1, 1, 1, 1)


def _stages() -> tuple:
    """SCAN_STAGES, or MAMBA_DENSE_SCAN_STAGES="f1,f0,b1,b0" (for comparisons)."""
    env = getenv("MAMBA_DENSE_SCAN_STAGES")
    return SCAN_STAGES if not env else tuple(int(v) for v in env.split(","))


def _ct(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _fast_exp(x: torch.Tensor) -> bool:
    """Decays through ``ex2.approx.ftz`` (``_decay``), and softplus / sigmoid through ``_softplus_fast`` /
    ``_sigmoid_fast``: fp32 state on a GPU (the interpreter cannot run
    inline PTX; fp64 keeps tl.exp). On the H100 (benchmarks/RESULTS.md, session 9) it took S5 N=16's
    forward from 2.26 to 2.11 ms and, once the loads were reordered, the N=16 backward 5.5% faster
    (f+b S4 5.24 -> 4.95 ms, S5 N=16 7.41 -> 7.01). MAMBA_DENSE_SCAN_FAST_EXP=0 turns it off, for
    comparisons."""
    return x.is_cuda and x.dtype != torch.float64 and getenv("MAMBA_DENSE_SCAN_FAST_EXP", "1") != "0"


_SMS: dict = {}


def _num_sms(dev: torch.device) -> int:
    """The SM count of dev's GPU (1 for other devices), cached: get_device_properties took about
    14 us of host time per call on the H100's host, four times per forward + backward."""
    if dev.type != "cuda":
        return 1
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    n = _SMS.get(idx)
    if n is None:
        n = _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


# Chunk-parallel policy: a launch with fewer than MIN programs per SM is split along L into chunks
# until it has about TARGET programs per SM (H100 sweep: splitting a launch that already has
# enough programs costs more in the extra phase than it gains). TARGET was 32 while the carry
# walked the chunks one at a time; with the block-scanned carry more chunks pay (H100, session 7,
# f+b ms at 32 / 64 / 128: S2 2.96 / 2.80 / 2.74, S5 N=16 9.59 / 9.29 / 8.99, S5 N=1 2.34 / 2.41 / 2.38).
MIN_PROGRAMS_PER_SM = int(os.environ.get("MAMBA_DENSE_MIN_PROGRAMS_PER_SM", "4"))
TARGET_PROGRAMS_PER_SM = int(os.environ.get("MAMBA_DENSE_TARGET_PROGRAMS_PER_SM", "128"))
# ... except for calls whose chunks would merge their routes by reversed pairs (_pairable) along
# routes of at least PAIR_MIN_STEPS steps: those are split below PAIR_MIN_PROGRAMS_PER_SM. The pairs
# write the output (and dx) once per pair in place, where a launch without chunks writes K per-route
# planes and sums them (benchmarks/RESULTS.md, session 22). H100, cross2d, D 96, N 1, bf16, kernel ms,
# forward / forward + backward, one pass -> chunked pairs: 56x56 (3136 steps) b32 0.193 / 0.656 ->
# 0.158 / 0.510, b64 (S1) 0.307 / 1.097 -> 0.293 / 0.945, b96 0.677 / 2.043 -> 0.426 / 1.389, b128
# 0.809 / 2.455 -> 0.563 / 1.859, b192 (35 programs per SM) 1.118 / 3.628 -> 1.034 / 2.985; 64x64 b64
# 0.407 / 1.510 -> 0.377 / 1.221; 48x48 b64 0.225 / 0.793 -> 0.227 / 0.725. Shorter routes lose or
# draw: 40x40 b64 0.156 / 0.532 -> 0.168 / 0.521, 32x32 D 192 b32 0.101 / 0.349 -> 0.107 / 0.329, 28x28
# D 192 b32 0.074 / 0.256 -> 0.099 / 0.303. N = 16 (no pairs) loses too: S4 0.80 / 4.05 -> 1.22 / 4.43.
PAIR_MIN_PROGRAMS_PER_SM = int(os.environ.get("MAMBA_DENSE_PAIR_MIN_PROGRAMS_PER_SM", "48"))
PAIR_MIN_STEPS = 2048
# The backward's chunks are at least this many tiles (or half the route, if that is less). With the
# policy's 3-tile chunks, S3 (1024 x 1024, batch 1: 12 programs per launch, 1366 chunks) spent more in
# the per-chunk work and the carry than the extra programs gained: H100, session 17, S3's backward
# kernels 0.367 -> 0.342 ms with chunks of 6 tiles; S2 (3 -> 6 tiles) unchanged, S5 (18 tiles) untouched.
BWD_MIN_TILES_PER_CHUNK = 6
# The backward's dx merge by reversed route pairs (scan_bwd; 0: always the per-route buffer and its
# sum), for launches with channel blocks of at least BWD_PAIR_MIN_BD, its chunk divisor, and where the
# running dx sum is loaded (1: with the tile's other inputs, 0: at the store). H100, session 18, kernel
# ms of forward + backward, buffer -> pairs (loaded early / at the store): S2 1.568 -> 1.530 / 1.603,
# S3 0.455 -> 0.430 / 0.452 (blocks of 32); S5 N=1 (blocks of 16) 1.493 -> 1.739 / 1.558, so it keeps
# the buffer. Chunk divisors 1 and 3 were slower than 2 on S2 and S3.
BWD_PAIRS = 1
BWD_PAIR_MIN_BD = 32
BWD_PAIR_CHUNK_DIV = 2
BWD_PAIR_PREV_EARLY = 1
# the gradient pass's products through sB = sum_n dh B and w = dh a h_{s-1} (_bwd_route_chunk's SB_ALGEBRA), for
# N > 1. H100, session 23, kernel ms f+b, two alternations: S4 4.033-4.037 -> 3.983-3.987, S5 N=16 5.070-5.072 ->
# 4.972-4.974 (offline SASS of the N=16 loop, Triton 3.8: 1324 -> 1230 instructions, its 2 spill stores gone);
# N = 1 lost (S1 0.938-0.952 -> 0.973-0.977, S2 1.228 -> 1.278, S3 0.352 -> 0.365, S5 N=1 1.311-1.315 ->
# 1.329-1.331), so it keeps the old products. 0 turns it off.
BWD_SB_ALGEBRA = int(os.environ.get("MAMBA_DENSE_BWD_SB_ALGEBRA", "1"))


# CUDA caps a grid's second and third dimensions at 65535 programs. The scan's launches put the chunks on the
# second and the batch on the third, and the chunk carry its batch x K state rows on the second: a call with more
# batch elements than this runs as batch slices (scan_fwd, scan_bwd), a launch whose batch x K rows pass it is not
# split into chunks, and no launch gets more chunks than this (_tiles_per_chunk, _pair_plan). Without it such a
# call failed in the launch with CUDA's "invalid argument" (e.g. many small regions folded into the batch).
MAX_GRID_YZ = 65535


def _batch_slices(batch: int) -> list:
    """Slices of the batch with at most MAX_GRID_YZ elements each."""
    return [slice(b, min(batch, b + MAX_GRID_YZ)) for b in range(0, batch, MAX_GRID_YZ)]


def _sum_slices(parts: list):
    """The sum of the batch slices' gradients of a parameter (None where it is absent), added in slice order
    in fp32 (fp64 for fp64) and returned in the parameter's dtype."""
    if parts[0] is None:
        return None
    acc = parts[0].to(torch.promote_types(parts[0].dtype, torch.float32), copy=True)
    for g in parts[1:]:
        acc += g
    return acc.to(parts[0].dtype)


def _min_programs(pairable: bool, S: int) -> int:
    """Programs per SM below which a launch is split into chunks (see PAIR_MIN_PROGRAMS_PER_SM)."""
    return PAIR_MIN_PROGRAMS_PER_SM if pairable and S >= PAIR_MIN_STEPS else MIN_PROGRAMS_PER_SM


def _tiles_per_chunk(n_tiles: int, programs: int, n_sm: int, override: int | None = None,
                     min_tiles: int = 2, min_programs: int | None = None, rows: int = 1) -> int:
    """Tiles one program walks; fewer than n_tiles means chunk-parallel (3 phases): when the launch has
    fewer than min_programs (default MIN_PROGRAMS_PER_SM) programs per SM. Chunks hold at least
    min(min_tiles, n_tiles // 2) tiles and 2. Within the grid's limits (MAX_GRID_YZ): at most that many
    chunks, and none when the carry's rows (batch x K) pass it."""
    if rows > MAX_GRID_YZ:
        return n_tiles
    least = _cdiv(n_tiles, MAX_GRID_YZ)
    if override is not None:
        return max(1, least, min(int(override), n_tiles))
    if min_programs is None:
        min_programs = MIN_PROGRAMS_PER_SM
    if programs >= min_programs * n_sm or n_tiles < 4:
        return n_tiles
    want_chunks = -(-TARGET_PROGRAMS_PER_SM * n_sm // max(1, programs))
    return max(2, least, min(min_tiles, n_tiles // 2), -(-n_tiles // want_chunks))


# The order of the pair merge's launches (_group_order): the last group reads and adds to what the
# others wrote. For cross2d (pairs (0, 2): rows, (1, 3): columns) the forward gains a little with the
# row pair last (whose read-add-writes of the output then walk the tokens in memory order: the likely
# reason, not measured apart); the backward's dx merge does not. H100, session 20, kernel ms, two
# alternations, order 0 -> 1: forward S2 0.402 -> 0.399, S3 0.116 -> 0.114, S5 N=1 level; the
# backward's in order 1: S2 f+b 1.249 -> 1.283, S3 0.367 -> 0.359 (not taken)
FWD_GROUP_ORDER = 1
BWD_GROUP_ORDER = 0


def _group_order(groups, order: int):
    """The order the pair merge launches its route groups in: single routes first, then the pairs in
    route order (order 0) or in reverse route order (1); see FWD_GROUP_ORDER."""
    return sorted(groups, key=lambda g: (len(g), g if order == 0 else tuple(-k for k in g)))


def _merge_strategy() -> str:
    """How routes are merged (all deterministic): "pairs" (default) merges reversed route pairs in
    place in chunk-parallel forwards (_pair_plan) and otherwise works as "buffer"; "buffer" writes
    per-route outputs and sums them in a second pass; "serial" runs one launch per route with a
    read-add-write of an fp32 accumulator (less memory, less parallelism). Set MAMBA_DENSE_MERGE to
    choose."""
    v = getenv("MAMBA_DENSE_MERGE", "pairs")
    if v not in ("pairs", "buffer", "serial"):
        raise ValueError(f"MAMBA_DENSE_MERGE must be 'pairs', 'buffer' or 'serial', got {v!r}")
    return v


def _merge_modes(K: int, cover: tuple[bool, ...]) -> tuple[list[int], bool]:
    """Launch modes for the serial route merge, and whether the accumulator needs zeros."""
    if K == 1 and cover[0]:
        return [4], False
    if cover[0] and cover[-1]:
        return [1] + [2] * (K - 2) + [3], False
    return [2] * K, True


# Host path of the forward: the decisions of a call (tiles, channel blocks, chunks, merge plan, launch
# options) depend only on the call's signature, so they are worked out once per signature (_fwd_plan)
# and each launch site keeps the compiled kernel Triton returned for it (_run), which later calls
# launch directly: launch()'s key (the arguments' specialization) is then fixed by the plan's key,
# which holds the dtypes, shapes and pointer alignment of the inputs (the buffers the forward
# allocates are aligned). H100 host, S3 (session 20): a launch() cost 26.7 us, 9.4 of them for the key
# and 12.9 for the launcher; host us per call without / with the plans, alternated: scan_fwd 249-259 ->
# 121-128, scan_bwd 420-429 -> 257-266 (benchmarks/RESULTS.md). MAMBA_DENSE_SCAN_PLAN=0 turns it off.
_FWD_PLANS: dict = {}
_PDL_OK: dict = {}


def _pdl_ok(dev: torch.device) -> bool:
    """Whether kernels on dev can be launched with programmatic dependent launch: a CUDA GPU of compute
    capability 9.0 or later (griddepcontrol), a Triton whose launcher takes launch_pdl, and not Triton's
    interpreter. Cached per device."""
    ok = _PDL_OK.get(dev)
    if ok is None:
        ok = False
        if dev.type == "cuda" and getenv("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(dev)[0] >= 9:
            try:
                from triton.backends.nvidia.compiler import CUDAOptions

                ok = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
            except ImportError:
                ok = False
        _PDL_OK[dev] = ok
    return ok


def _pdl_on(dev: torch.device) -> int:
    """The scan kernels' programmatic dependent launch (_pdl_start's PDL; 0: none): where _pdl_ok, not
    while a CUDA graph is being captured; MAMBA_DENSE_SCAN_PDL=0 / 1 / 2 chooses (default 1)."""
    env = getenv("MAMBA_DENSE_SCAN_PDL", "1")
    if env not in ("0", "1", "2"):
        raise ValueError(f"MAMBA_DENSE_SCAN_PDL={env!r}: expected 0 (off), 1 (the default) or 2; "
                         "unset it for the default")
    mode = int(env)
    return mode if mode and _pdl_ok(dev) and not torch.cuda.is_current_stream_capturing() else 0


def _pdl_meta(pdl: int) -> dict:
    """The constexpr and the launch option of a kernel launched with programmatic dependent launch."""
    return {"PDL": pdl, "launch_pdl": True} if pdl else {}


_PLAN_ENV = (
    "MAMBA_DENSE_MERGE", "MAMBA_DENSE_SCAN_CFG", "MAMBA_DENSE_SCAN_I64", "MAMBA_DENSE_FWD_PREFETCH",
    "MAMBA_DENSE_SCAN_EVEN", "MAMBA_DENSE_SCAN_STAGES", "MAMBA_DENSE_SCAN_MAXNREG", "MAMBA_DENSE_CARRY_CB",
    "MAMBA_DENSE_CARRY_CFG",
    "MAMBA_DENSE_SCAN_FAST_EXP", "TRITON_INTERPRET", "MAMBA_DENSE_SCAN_PDL",
)


def _knobs() -> tuple:
    """What the forward's decisions read besides the inputs: the environment knobs and the policy's
    module attributes (tests and benchmarks/scan_kernels.py change both)."""
    return (
        _launch_mod.env_snapshot(_PLAN_ENV), MIN_PROGRAMS_PER_SM, TARGET_PROGRAMS_PER_SM, PAIR_CHUNK_DIV,
        PAIR_MAX_N, SCAN_STAGES, FWD_GROUP_ORDER, EVEN_FLAGS, id(_REG_CAPS), PAIR_MIN_PROGRAMS_PER_SM, PAIR_MIN_STEPS,
    )


def _aligned(*ts) -> tuple:
    """16-byte alignment of each tensor (None for an absent one): part of Triton's specialization."""
    return tuple(None if t is None else t.data_ptr() & 15 == 0 for t in ts)


def _run(site: list, fn, grid, args: tuple, meta: dict):
    """launch(fn, grid, *args, **meta) for a launch site of a cached plan: site is [fn, launch()'s cache
    entry] once known (after the first call), and later calls launch that entry directly. A kernel
    replaced meanwhile (tests), an active launch hook or Triton's interpreter take launch()."""
    entry = site[1]
    if entry is not None and site[0] is fn and not _launch_mod._hooks_set():
        _launch_mod.run_entry(entry, grid, args)
        return
    entry = launch(fn, grid, *args, **meta)
    if entry is not None:
        site[:] = [fn, entry]


def _launch_all(site: list, fn, grid, args: tuple, meta: dict):
    """_run without the sites (MAMBA_DENSE_SCAN_PLAN=0): every launch through launch()."""
    launch(fn, grid, *args, **meta)


def _plan_groups(x, A, route, cover, merge):
    """The route's merge groups where a pair plan may read them (cached per route tensor), else None:
    part of a plan's key."""
    if merge == "sum" and x.dim() == 3 and route.shape[0] > 1 and A.shape[2] <= PAIR_MAX_N and all(cover):
        return route_groups(route)
    return None


def _cached_plan(cache: dict, key_fn, build):
    """(plan, run): build()'s plan cached under key_fn() and _run, or with MAMBA_DENSE_SCAN_PLAN=0 a
    fresh plan and _launch_all."""
    if getenv("MAMBA_DENSE_SCAN_PLAN", "1") == "0":
        return build(), _launch_all
    key = key_fn()
    p = cache.get(key)
    if p is None:
        if len(cache) > 256:
            cache.clear()
        p = cache[key] = build()
    return p, _run


class _FwdPlan:
    """scan_fwd's decisions for one call signature (see _fwd_plan) and its launch sites."""

    def __init__(self, x, A, route, cover, merge, out_dtype, save_states, tiles_per_chunk, dt_softplus,
                 has_D, has_bias, pdl: int = 0):
        self.pdl = pdl
        self.x_per_route = x_per_route = x.dim() == 4
        batch, L, Dm = x.shape[0], x.shape[1], x.shape[-1]
        K, S = route.shape
        N = A.shape[2]
        self.cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        cfg = _config(N, Dm, x.dtype)
        T, BD, warps, SUB = cfg.Tf, cfg.BDf, cfg.warps, cfg.Tf // cfg.T
        NP = _np2(N)
        n_tiles = _cdiv(S, T)
        self.n_slots = _cdiv(S, cfg.T)  # saved states: one every cfg.T steps
        n_dblk = _cdiv(Dm, BD)
        self.odt = odt = out_dtype or x.dtype
        dev = x.device
        self.serial = serial = _merge_strategy() == "serial"
        routes_per_launch = K if (merge == "none" or not serial) else 1
        minp = _min_programs(_pairable(route, merge, x_per_route, cover, S, T, odt, N), S)
        tpc = _tiles_per_chunk(n_tiles, batch * n_dblk * routes_per_launch, _num_sms(dev), tiles_per_chunk,
                               min_programs=minp, rows=batch * K)
        if _wide_block(N, Dm, x.dtype, tpc < n_tiles):
            BD = 32
            n_dblk = _cdiv(Dm, BD)
            tpc = _tiles_per_chunk(n_tiles, batch * n_dblk * routes_per_launch, _num_sms(dev), tiles_per_chunk,
                                   min_programs=minp, rows=batch * K)
        plan = _pair_plan(route, merge, x_per_route, cover, S, T, n_tiles, tpc, odt, N, tiles_per_chunk is not None)
        if plan is not None:
            tpc = plan[1]
        self.groups = None if plan is None else _group_order(plan[0], FWD_GROUP_ORDER)
        self.n_chunks = n_chunks = _cdiv(n_tiles, tpc)
        self.chunked = chunked = n_chunks > 1
        self.SUB, self.n_tiles, self.n_dblk, self.tpc = SUB, n_tiles, n_dblk, tpc
        common = dict(
            HAS_D=has_D, HAS_BIAS=has_bias, SOFTPLUS=dt_softplus,
            T=T, BD=BD, NP=NP, CT=_ct(x.dtype), num_warps=warps, X_PER_ROUTE=x_per_route,
            FAST_EXP=_fast_exp(x), SUB=SUB, **_even("fwd", S, T, Dm, BD), **_pdl_meta(pdl),
        )
        stages = _stages()
        pf1, pf0 = _fwd_prefetch(NP, chunked, 1), _fwd_prefetch(NP, chunked, 0)
        self.meta1 = dict(MODE=0, PHASE=1, HAS_H0=False, STORE_STATES=False, STAGES=stages[0], PREFETCH=pf1,
                          **common, **_reg_cap("fwd", NP, T, BD, warps, 1, pf1))
        self.meta3 = dict(PHASE=0, HAS_H0=chunked, STORE_STATES=save_states, STAGES=stages[1], PREFETCH=pf0,
                          **common, **_reg_cap("fwd", NP, T, BD, warps, 0, pf0))
        if plan is None and merge == "sum" and not serial:
            self.bdt = odt if odt in (torch.bfloat16, torch.float32, torch.float64) else torch.float32
        else:
            self.bdt = odt
        self.modes, self.zero = _merge_modes(K, cover)
        self.sites: dict = {}

    def site(self, name) -> list:
        s = self.sites.get(name)
        if s is None:
            s = self.sites[name] = [None, None]
        return s


def _fwd_plan(x, dt, A, B, C, D, dt_bias, route, kroute, cover, merge, dt_softplus, out_dtype, save_states,
              tiles_per_chunk):
    """(_FwdPlan, run) of a call (_cached_plan). The key: everything the decisions and the kernels'
    specialization read (input shapes, A's included, whose state size sets the tiles; dtypes and
    alignment, the route's coverage and merge groups, the device and its SM count, the knobs); a new
    key builds a plan."""
    groups = _plan_groups(x, A, route, cover, merge)
    pdl = _pdl_on(x.device)
    return _cached_plan(_FWD_PLANS, lambda: (
        tuple(x.shape), tuple(A.shape), x.dtype, dt.dtype, A.dtype, B.dtype, C.dtype, None if D is None else D.dtype,
        None if dt_bias is None else dt_bias.dtype, tuple(route.shape), merge, dt_softplus, out_dtype, save_states,
        tiles_per_chunk, x.device, cover, kroute.dtype, groups, _num_sms(x.device), _knobs(),
        _aligned(x, dt, A, B, C, D, dt_bias, kroute), pdl,
    ), lambda: _FwdPlan(x, A, route, cover, merge, out_dtype, save_states, tiles_per_chunk, dt_softplus,
                        D is not None, dt_bias is not None, pdl))


def scan_fwd(x, dt, A, B, C, D, dt_bias, route, merge: str, dt_softplus: bool, out_dtype,
             save_states: bool = True, tiles_per_chunk: int | None = None):
    """Forward. Returns (y, states): states are the fp32 states entering every tile (for backward).

    x is (b, L, D), or (b, L, K, D) for one input per route.
    MAMBA_DENSE_SCAN_IMPL=seq (read at each call) runs the experimental per-step sequential forward
    of triton_scan_seq.py instead; its states feed the same backward.
    """
    from . import triton_scan_seq

    if x.shape[0] > MAX_GRID_YZ:  # the grid's third dimension holds the batch: run it in slices
        parts = [scan_fwd(x[sl], dt[sl], A, B[sl], C[sl], D, dt_bias, route, merge, dt_softplus, out_dtype,
                          save_states, tiles_per_chunk) for sl in _batch_slices(x.shape[0])]
        return torch.cat([y for y, _ in parts]), (torch.cat([st for _, st in parts]) if save_states else parts[0][1])
    if triton_scan_seq.impl() == "seq":
        return triton_scan_seq.scan_fwd_seq(x, dt, A, B, C, D, dt_bias, route, merge, dt_softplus, out_dtype,
                                            save_states, tiles_per_chunk)
    batch, L, Dm = x.shape[0], x.shape[1], x.shape[-1]
    K, S = route.shape
    N = A.shape[2]
    cover = route_coverage(route, L)
    kroute = _kernel_route(route, batch * L * K * max(Dm, N))
    p, run = _fwd_plan(x, dt, A, B, C, D, dt_bias, route, kroute, cover, merge, dt_softplus, out_dtype, save_states,
                       tiles_per_chunk)
    n_dblk, n_chunks, n_tiles, tpc, odt, cdt, dev = p.n_dblk, p.n_chunks, p.n_tiles, p.tpc, p.odt, p.cdt, x.device
    states, D_, bias_ = fwd_buffers(batch, K, p.n_slots, N, Dm, dev, cdt, save_states or p.chunked, D, dt_bias)
    dummy = states
    if p.chunked:
        # phase 1: every chunk of every route from a zero state -> slot of the chunk's first tile
        dsum = _empty(batch, K, p.n_slots, Dm, device=dev, dtype=cdt)
        # (by pairs, as the output pass, it was slower: H100, session 16, phase 1 S2 243 -> 260 us, S3 67
        # -> 84, S5 N=1 205 -> 227; a pair's second route finds x in the L2 either way)
        run(p.site("phase1"), _fwd_kernel, (K * n_dblk, n_chunks, batch),
            (x, dt, A, B, C, D_, bias_, kroute, dummy, dummy, states, dsum,
             L, S, Dm, N, K, 0, K, n_tiles, tpc, 0, 0), p.meta1)
        # phase 2: carry across chunks
        carry(states, dsum, A, n_chunks, tpc * p.SUB, p.n_slots, Dm, N, K, reverse=False, rows=batch * K,
              site=p.site("carry"), run=run, pdl=p.pdl)
    if p.groups is not None:
        # reversed route pairs (and single routes) summed in place into out, one group per launch
        # single routes first (H100, session 16, S5 N=1 forward 0.478 -> 0.471 ms; launching them
        # with REPS=1 instead was slower, 0.486)
        out = _empty(batch, L, Dm, device=dev, dtype=odt)
        for gi, grp in enumerate(p.groups):
            run(p.site(("group", gi)), _fwd_kernel, (n_dblk, n_chunks, batch),
                (x, dt, A, B, C, D_, bias_, kroute, out, dummy, states, dummy,
                 L, S, Dm, N, K, grp[0], 1, n_tiles, tpc, grp[-1] if len(grp) == 2 else -1, int(gi > 0)),
                dict(p.meta3, MODE=5, REPS=2))
    elif merge == "none" or not p.serial:
        # all routes in one launch, per-route outputs at their tokens; merge="sum" then adds the
        # K routes in a fixed order (deterministic) with fp32 accumulation
        out = (_empty if all(cover) else torch.zeros)(batch, L, K, Dm, device=dev, dtype=p.bdt)
        run(p.site("routes"), _fwd_kernel, (K * n_dblk, n_chunks, batch),
            (x, dt, A, B, C, D_, bias_, kroute, out, dummy, states, dummy,
             L, S, Dm, N, K, 0, K, n_tiles, tpc, 0, 0), dict(p.meta3, MODE=0))
        if merge == "sum":
            out = sum_routes(out, odt, site=p.site("sum_routes"), run=run, pdl=p.pdl)
    else:
        out = _empty(batch, L, Dm, device=dev, dtype=odt)
        modes, zero = p.modes, p.zero
        need_acc = modes != [4]
        acc = (torch.zeros if zero else _empty)(batch, L, Dm, device=dev, dtype=cdt) if need_acc else dummy
        for k, mode in enumerate(modes):
            run(p.site(("serial", k)), _fwd_kernel, (n_dblk, n_chunks, batch),
                (x, dt, A, B, C, D_, bias_, kroute, out, acc, states, dummy,
                 L, S, Dm, N, K, k, 1, n_tiles, tpc, 0, 0), dict(p.meta3, MODE=mode))
        if modes[-1] == 2:
            out.copy_(acc)
    if not save_states:
        states = states.new_empty(0)
    return out, states


class _BwdPlan:
    """scan_bwd's decisions for one call signature (see _bwd_plan) and its launch sites."""

    def __init__(self, x, A, B, C, route, cover, merge, dt_softplus, tiles_per_chunk, has_D, has_bias,
                 pdl: int = 0):
        self.pdl = pdl
        self.x_per_route = x_per_route = x.dim() == 4
        batch, L, Dm = x.shape[0], x.shape[1], x.shape[-1]
        K, S = route.shape
        N = A.shape[2]
        self.cdt = cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        cfg = _config(N, Dm, x.dtype)
        T, BD, warps = cfg.T, cfg.BDb, cfg.warps_b or cfg.warps
        NP = _np2(N)
        n_tiles = _cdiv(S, T)
        dev = x.device
        self.serial = serial = _merge_strategy() == "serial"
        routes_per_launch = K if (x_per_route or not serial) else 1
        n_dblk = _cdiv(Dm, BD)
        per_launch = batch * n_dblk * routes_per_launch
        # chunks that would merge dx by pairs (blocks of BWD_PAIR_MIN_BD or more once chunked) split as
        # the forward's (_min_programs)
        pair_bd = 32 if _wide_block(N, Dm, x.dtype, True) else BD
        minp = _min_programs(BWD_PAIRS and not serial and pair_bd >= BWD_PAIR_MIN_BD
                             and _pairable(route, merge, x_per_route, cover, S, T, x.dtype, N), S)
        tpc = _tiles_per_chunk(n_tiles, per_launch, _num_sms(dev), tiles_per_chunk, BWD_MIN_TILES_PER_CHUNK, minp,
                               batch * K)
        if _wide_block(N, Dm, x.dtype, tpc < n_tiles):
            BD = 32
            n_dblk = _cdiv(Dm, BD)
            per_launch = batch * n_dblk * routes_per_launch
            tpc = _tiles_per_chunk(n_tiles, per_launch, _num_sms(dev), tiles_per_chunk, BWD_MIN_TILES_PER_CHUNK, minp,
                                   batch * K)
        # dx merged by reversed route pairs in place, as the forward's output (_pair_plan), with chunks of
        # the policy's tiles // BWD_PAIR_CHUNK_DIV
        plan = None
        if BWD_PAIRS and not serial and BD >= BWD_PAIR_MIN_BD:
            plan = _pair_plan(route, merge, x_per_route, cover, S, T, n_tiles, tpc, x.dtype, N,
                              tiles_per_chunk is not None, BWD_PAIR_CHUNK_DIV)
            if plan is not None:
                tpc = plan[1]
        self.groups = None if plan is None else _group_order(plan[0], BWD_GROUP_ORDER)
        self.n_chunks = n_chunks = _cdiv(n_tiles, tpc)
        self.chunked = n_chunks > 1
        self.n_tiles, self.n_dblk, self.tpc = n_tiles, n_dblk, tpc
        self.dBp_dtype, self.dCp_dtype = _partial_dtype(B.dtype, cdt), _partial_dtype(C.dtype, cdt)
        self.xdt = x.dtype if x.dtype in (torch.bfloat16, torch.float32, torch.float64) else torch.float32
        kw = dict(
            HAS_D=has_D, HAS_BIAS=has_bias, SOFTPLUS=dt_softplus,
            DY_PER_ROUTE=(merge == "none"), T=T, BD=BD, NP=NP, CT=_ct(x.dtype), num_warps=warps,
            X_PER_ROUTE=x_per_route, FAST_EXP=_fast_exp(x), INTERP=getenv("TRITON_INTERPRET") == "1",
            **_even("bwd", S, T, Dm, BD), **_pdl_meta(pdl),
        )
        stages = _stages()
        cap0 = _reg_cap("bwd", NP, T, BD, warps, 0)
        self.meta1 = dict(DXMODE=4, PHASE=1, HAS_G0=False, STAGES=stages[2], **kw, **_reg_cap("bwd", NP, T, BD, warps, 1))
        self.meta0 = dict(PHASE=0, HAS_G0=self.chunked, STAGES=stages[3], SB_ALGEBRA=bool(BWD_SB_ALGEBRA) and NP > 1,
                          **kw, **cap0)
        self.meta_pairs = dict(self.meta0, DXMODE=5, REPS=2, PREV_EARLY=bool(BWD_PAIR_PREV_EARLY))
        self.modes, self.zero = _merge_modes(K, cover)
        self.sites: dict = {}

    site = _FwdPlan.site


_BWD_PLANS: dict = {}


def _bwd_knobs() -> tuple:
    """_knobs for the backward: its policy attributes besides the forward's."""
    return (_knobs(), BWD_MIN_TILES_PER_CHUNK, BWD_PAIRS, BWD_PAIR_MIN_BD, BWD_PAIR_CHUNK_DIV, BWD_PAIR_PREV_EARLY,
            BWD_SB_ALGEBRA, BWD_GROUP_ORDER, SUM_PARAMS_UNROLL)


def _bwd_plan(dy, x, dt, A, B, C, D, dt_bias, route, kroute, states, cover, merge, dt_softplus,
              tiles_per_chunk):
    """(_BwdPlan, run) of a call (the key as _fwd_plan's, with dy and the states)."""
    groups = _plan_groups(x, A, route, cover, merge)
    pdl = _pdl_on(x.device)
    return _cached_plan(_BWD_PLANS, lambda: (
        tuple(x.shape), tuple(A.shape), x.dtype, dt.dtype, A.dtype, B.dtype, C.dtype, None if D is None else D.dtype,
        None if dt_bias is None else dt_bias.dtype, dy.dtype, tuple(dy.shape), states.dtype, tuple(states.shape),
        tuple(route.shape), merge, dt_softplus, tiles_per_chunk, x.device, cover, kroute.dtype, groups,
        _num_sms(x.device), _bwd_knobs(), _aligned(dy, x, dt, A, B, C, D, dt_bias, kroute, states), pdl,
    ), lambda: _BwdPlan(x, A, B, C, route, cover, merge, dt_softplus, tiles_per_chunk, D is not None,
                        dt_bias is not None, pdl))


def scan_bwd(dy, x, dt, A, B, C, D, dt_bias, route, states, merge: str, dt_softplus: bool,
             tiles_per_chunk: int | None = None):
    """Backward from the forward's tile states: per tile, recompute the states and run the reverse scan.
    Its decisions and launch sites are cached per call signature, as the forward's (_bwd_plan, _run)."""
    if x.shape[0] > MAX_GRID_YZ:  # batch slices, as scan_fwd's
        parts = [scan_bwd(dy[sl], x[sl], dt[sl], A, B[sl], C[sl], D, dt_bias, route, states[sl], merge, dt_softplus,
                          tiles_per_chunk) for sl in _batch_slices(x.shape[0])]
        per_token = [torch.cat([g[i] for g in parts]) for i in (0, 1, 3, 4)]
        dA, dD, dbias = (_sum_slices([g[i] for g in parts]) for i in (2, 5, 6))
        return per_token[0], per_token[1], dA, per_token[2], per_token[3], dD, dbias
    batch, L, Dm = x.shape[0], x.shape[1], x.shape[-1]
    K, S = route.shape
    N = A.shape[2]
    dev = x.device
    dy = dy.contiguous()
    cover = route_coverage(route, L)
    kroute = _kernel_route(route, batch * L * K * max(Dm, N))
    p, run = _bwd_plan(dy, x, dt, A, B, C, D, dt_bias, route, kroute, states, cover, merge, dt_softplus,
                       tiles_per_chunk)
    n_dblk, n_chunks, n_tiles, tpc, cdt = p.n_dblk, p.n_chunks, p.n_tiles, p.tpc, p.cdt
    dummy = states
    D_ = D if D is not None else dummy
    bias_ = dt_bias if dt_bias is not None else dummy
    ddt = (_empty_like if all(cover) else torch.zeros_like)(dt)
    alloc_bc = _empty if all(cover) else torch.zeros
    dBp = alloc_bc(n_dblk, batch, L, K, N, device=dev, dtype=p.dBp_dtype)
    dCp = alloc_bc(n_dblk, batch, L, K, N, device=dev, dtype=p.dCp_dtype)
    # dA, dD, dbias partials per (b, chunk, k): one buffer, rows N and N + 1 of each (N + 2, D) slab
    # hold dD and dbias (left unwritten, and their sums unused, when D / dt_bias are absent)
    pp = _empty(batch, n_chunks, K, N + 2, Dm, device=dev, dtype=cdt)
    gbuf = gsum = dummy
    if p.chunked:
        gbuf = _empty(batch, K, n_chunks, N, Dm, device=dev, dtype=cdt)
        gsum = _empty(batch, K, n_chunks, Dm, device=dev, dtype=cdt)
        run(p.site("phase1"), _bwd_kernel, (K * n_dblk, n_chunks, batch),
            (x, dt, A, B, C, D_, bias_, kroute, states, dy,
             dummy, dummy, ddt, dBp, dCp, pp, pp, pp, gbuf, gsum,  # phase 1 writes no dx
             batch, L, S, Dm, N, K, 0, K, n_tiles, tpc, n_chunks, 0, 0), p.meta1)
        carry(gbuf, gsum, A, n_chunks, 1, n_chunks, Dm, N, K, reverse=True, rows=batch * K,
              site=p.site("carry"), run=run, pdl=p.pdl)
    if p.groups is not None:
        dx = _empty_like(x)
        for gi, grp in enumerate(p.groups):
            run(p.site(("group", gi)), _bwd_kernel, (n_dblk, n_chunks, batch),
                (x, dt, A, B, C, D_, bias_, kroute, states, dy,
                 dx, dummy, ddt, dBp, dCp, pp, pp, pp, gbuf, gsum,
                 batch, L, S, Dm, N, K, grp[0], 1, n_tiles, tpc, n_chunks, grp[-1] if len(grp) == 2 else -1,
                 int(gi > 0)), p.meta_pairs)
    elif p.x_per_route or not p.serial:
        if p.x_per_route:
            dx = dxbuf = (_empty_like if all(cover) else torch.zeros_like)(x)  # per-route dx, no merge
        elif K == 1 and cover[0]:
            dx = dxbuf = _empty_like(x)
        else:
            dx = None  # the routes' sum of dxbuf, below
            dxbuf = (_empty if all(cover) else torch.zeros)(batch, L, K, Dm, device=dev, dtype=p.xdt)
        run(p.site("routes"), _bwd_kernel, (K * n_dblk, n_chunks, batch),
            (x, dt, A, B, C, D_, bias_, kroute, states, dy,
             dxbuf, dummy, ddt, dBp, dCp, pp, pp, pp, gbuf, gsum,
             batch, L, S, Dm, N, K, 0, K, n_tiles, tpc, n_chunks, 0, 0), dict(p.meta0, DXMODE=0))
        if dx is None:
            dx = sum_routes(dxbuf, x.dtype, site=p.site("sum_routes"), run=run, pdl=p.pdl)
    else:
        dx = _empty_like(x)
        modes, zero = p.modes, p.zero
        need_acc = modes != [4]
        dxacc = (torch.zeros if zero else _empty)(batch, L, Dm, device=dev, dtype=cdt) if need_acc else dummy
        for k, mode in enumerate(modes):
            run(p.site(("serial", k)), _bwd_kernel, (n_dblk, n_chunks, batch),
                (x, dt, A, B, C, D_, bias_, kroute, states, dy,
                 dx, dxacc, ddt, dBp, dCp, pp, pp, pp, gbuf, gsum,
                 batch, L, S, Dm, N, K, k, 1, n_tiles, tpc, n_chunks, 0, 0), dict(p.meta0, DXMODE=mode))
        if modes[-1] == 2:
            dx.copy_(dxacc)
    dB, dC = sum_blocks2(dBp, B.dtype, dCp, C.dtype, site=p.site("sum_blocks"), run=run, pdl=p.pdl)
    # three separate tensors: the op's outputs must not alias one another
    dA, dD, dbias = sum_params(pp.view(batch * n_chunks, K * (N + 2) * Dm), K, N, Dm, A.dtype,
                               D.dtype if D is not None else None, dt_bias.dtype if dt_bias is not None else None,
                               site=p.site("sum_params"), run=run, pdl=p.pdl)
    return dx, ddt, dA, dB, dC, dD, dbias
