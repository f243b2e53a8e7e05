"""EXPERIMENTAL opt-in forward: a per-step sequential scan (``MAMBA_DENSE_SCAN_IMPL=seq``).

The default forward (``triton_scan._fwd_kernel``) scans [T, NP, BD] tiles with
``tl.associative_scan`` along the steps; benchmarks/RESULTS.md measured it instruction-issue bound.
This forward walks the route one step at a time instead, the way the CUDA kernels scan the items
of a thread: channels lie across the lanes, the state h (NP, BD) lives in registers (one fp32
register per thread and state for BD = 32 on one warp), and a step needs no cross-lane traffic.
Offline sm_90 compile (Triton 3.8, ptxas): N = 1, BD = 32, bf16: ~100 SASS instructions per step
for 32 channels (~40 of them the compensated softplus, kept for identical numerics), 52 registers,
no spills; N = 16: ~350 per step for 32 x 16 states, ~120 registers. Not yet timed on a GPU.

A program owns (batch b, route k, BD channels, one chunk of whole tiles) and per step s:
    tok = route[k, s];  gather x[b, tok, d], dt[b, tok, k, d], B[b, tok, k, :], C[b, tok, k, :]
    delta = softplus(dt + bias);  h = exp(delta * A) * h + delta * B * x
    out[b, tok, k, d] = sum_n C * h + D * x            (per-route buffer, MODE 0 of the default)
Padding steps (tok = -1) read dt = x = B = C = 0: the state decays by exp(softplus(bias) * A) and
nothing is stored (same as the default forward). The loop stops at S, so no step past the route.

Loads: a sequential loop is latency bound unless the gathers of later steps are in flight while
the current step computes. Two ways, chosen by the 4th field of MAMBA_DENSE_SEQ_CFG:
  * PREFETCH = 1 (default): registers rotate by hand: step s+1's x, dt, B, C and step s+2's
    token are loaded while step s computes, so nothing depends on Triton's pipeliner.
  * PREFETCH = 0: plain loads in the loop; ``tl.range(num_stages=STAGES)`` may pipeline them.
    Triton's pipeliner skips scalar loads (the token) and loads under 32 bits per thread
    (bf16 with one channel per lane), see AssignLatencies.cpp ``isSmallLoad``.

Compatibility with the default backward: when asked, the state entering every tile of T steps
(T from ``triton_scan._config``) is stored at ``states[b, k, tile]`` (layout (b, K, n_tiles, N, D)),
so ``triton_scan.scan_bwd`` runs unchanged on the result.

Parallelism over L (chunks of whole tiles) as in the default: phase 1 runs every chunk from a
zero state and stores its end state and summed delta in the slot of the chunk's first tile,
``triton_scan.carry`` turns them into chunk-start states, and the output pass (phase 3)
starts from them. Chunks are cut when batch * K * channel blocks is below
MAMBA_DENSE_SEQ_PROGRAMS_PER_SM (default 16) per SM, until the launch has about that many.

Tuning: MAMBA_DENSE_SEQ_CFG="BD,warps,stages[,prefetch]" (defaults 32,1,1,1), read at each call.
Routes are always merged through the per-route buffer and ``triton_scan.sum_routes``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import getenv, launch
from .triton_scan import (
    carry,
    _config,
    _ct,
    _empty,
    fwd_buffers,
    _num_sms,
    _route_params,
    _softplus,
    _tiles_per_chunk,
    route_coverage,
    sum_routes,
)

DEFAULT_PROGRAMS_PER_SM = 16
# per-token offsets go int64 when one batch element's dt (L * K * D elements, or B: L * K * N)
# reaches this; int32 otherwise (fewer instructions per step). Tests lower it to cover the int64 path.
_OFF64_LIMIT = 2**31


@triton.jit
def _seq_token(route_ptr, s, s_hi, OFF64: tl.constexpr):
    """Token of step s (route_ptr points at the program's route row); -1 past the last step.
    Returns (valid, token clamped to >= 0), the token as int32 unless OFF64."""
    tok = tl.load(route_ptr + s, mask=s < s_hi, other=-1)
    if not OFF64:
        tok = tok.to(tl.int32)
    return tok >= 0, tl.maximum(tok, 0)


@triton.jit
def _seq_gather(
    x_lane, dt_lane, B_lane, C_lane, valid, tok, xs, ds, bs, dmask, nmask,
    LOAD_C: tl.constexpr, CT: tl.constexpr,
):
    """One step's inputs: x, raw dt (BD,) and B, C (NP,); zeros for a padding step.

    *_lane are the program's per-lane pointers at token 0 (batch, route and channel folded in);
    xs, ds, bs are the per-token strides of x, dt (and out), B and C.
    """
    m = dmask & valid
    dtv = tl.load(dt_lane + tok * ds, mask=m, other=0.0).to(CT)
    xv = tl.load(x_lane + tok * xs, mask=m, other=0.0).to(CT)
    nm = nmask & valid
    Bv = tl.load(B_lane + tok * bs, mask=nm, other=0.0).to(CT)
    if LOAD_C:
        Cv = tl.load(C_lane + tok * bs, mask=nm, other=0.0).to(CT)
    else:
        Cv = Bv  # unused (phase 1)
    return xv, dtv, Bv, Cv


@triton.jit
def _fwd_seq_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr,
    out_ptr, states_ptr, dsum_ptr,
    L, S, Dm, N, K, n_tiles, tiles_per_prog,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    PHASE: tl.constexpr,  # 0: outputs to the per-route buffer out (b, L, K, D); 1: chunk-end state + summed delta
    HAS_H0: tl.constexpr,  # start from states[b, k, first tile of the chunk] (carried, chunk-parallel)
    STORE_STATES: tl.constexpr,  # store the state entering every tile (for the backward)
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, CT: tl.constexpr,
    X_PER_ROUTE: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr,
    OFF64: tl.constexpr,  # per-token offsets in int64 (one batch element's dt spans >= 2^31 elements)
):
    # grid (K * n_dblk, n_chunks, batch): the routes of one channel block are adjacent
    pid0 = tl.program_id(0)
    pid_c = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    k = pid0 % K
    pid_d = pid0 // K
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < Dm
    n = tl.arange(0, NP)
    nmask = n < N
    A, bias, Dv = _route_params(A_ptr, bias_ptr, D_ptr, k, Dm, N, d, dmask, n, nmask, HAS_BIAS, HAS_D, BD, CT)
    # per-lane pointers at token 0 of this (batch, route, channel block), int64 once per program;
    # in the loop a step only adds token * stride
    bk = b64 * L * K + k  # row (b, token 0, k) of (b, L, K, .)
    ds = K * Dm
    bs = K * N
    dt_lane = dt_ptr + bk * Dm + d
    out_lane = out_ptr + bk * Dm + d
    B_lane = B_ptr + bk * N + n
    C_lane = C_ptr + bk * N + n
    if X_PER_ROUTE:
        x_lane = x_ptr + bk * Dm + d
        xs = ds
    else:
        x_lane = x_ptr + b64 * L * Dm + d
        xs = Dm
    r_ptr = route_ptr + k * S
    st_base = (b64 * K + k) * n_tiles  # states: (b, K, n_tiles, N, D)
    st_off = n[:, None] * Dm + d[None, :]
    st_mask = nmask[:, None] & dmask[None, :]
    c_begin = pid_c * tiles_per_prog
    s_lo = c_begin * T
    s_hi = tl.minimum((c_begin + tiles_per_prog) * T, S)
    h = tl.zeros([NP, BD], dtype=CT)
    if HAS_H0:
        h = tl.load(states_ptr + (st_base + c_begin) * N * Dm + st_off, mask=st_mask, other=0.0).to(CT)
    dsum = tl.zeros([BD], dtype=CT)
    if PREFETCH:
        valid, tok = _seq_token(r_ptr, s_lo, s_hi, OFF64)
        valid_n, tok_n = _seq_token(r_ptr, s_lo + 1, s_hi, OFF64)
        xv, dtv, Bv, Cv = _seq_gather(x_lane, dt_lane, B_lane, C_lane, valid, tok, xs, ds, bs,
                                      dmask, nmask, PHASE == 0, CT)
    for s in tl.range(s_lo, s_hi, num_stages=STAGES):
        if PREFETCH:
            # in flight while this step computes: step s+1's inputs, step s+2's token
            valid_nn, tok_nn = _seq_token(r_ptr, s + 2, s_hi, OFF64)
            xn, dtn, Bn, Cn = _seq_gather(x_lane, dt_lane, B_lane, C_lane, valid_n, tok_n, xs, ds, bs,
                                          dmask, nmask, PHASE == 0, CT)
        else:
            valid, tok = _seq_token(r_ptr, s, s_hi, OFF64)
            xv, dtv, Bv, Cv = _seq_gather(x_lane, dt_lane, B_lane, C_lane, valid, tok, xs, ds, bs,
                                          dmask, nmask, PHASE == 0, CT)
        if STORE_STATES:
            if s % T == 0:  # state entering tile s // T
                tl.store(states_ptr + (st_base + s // T) * N * Dm + st_off, h, mask=st_mask)
        pre = dtv
        if HAS_BIAS:
            pre = pre + bias
        if SOFTPLUS:
            delta = _softplus(pre)
        else:
            delta = pre
        h = tl.exp(delta[None, :] * A) * h + (delta * xv)[None, :] * Bv[:, None]
        if PHASE == 1:
            dsum += delta
        else:
            y = tl.sum(h * Cv[:, None], axis=0)
            if HAS_D:
                y += Dv * xv
            tl.store(out_lane + tok * ds, y.to(out_ptr.dtype.element_ty), mask=dmask & valid)
        if PREFETCH:
            valid = valid_n
            tok = tok_n
            valid_n = valid_nn
            tok_n = tok_nn
            xv = xn
            dtv = dtn
            Bv = Bn
            Cv = Cn
    if PHASE == 1:
        # chunk-end state (from a zero start) and summed delta -> slot of the chunk's first tile,
        # the layout triton_scan._carry_kernel reads
        tl.store(states_ptr + (st_base + c_begin) * N * Dm + st_off, h, mask=st_mask)
        tl.store(dsum_ptr + (st_base + c_begin) * Dm + d, dsum, mask=dmask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def impl() -> str:
    """The forward selected by MAMBA_DENSE_SCAN_IMPL ("default" or "seq"), read at call time."""
    v = getenv("MAMBA_DENSE_SCAN_IMPL", "default") or "default"
    if v not in ("default", "seq"):
        raise ValueError(f"MAMBA_DENSE_SCAN_IMPL must be 'default' or 'seq', got {v!r}")
    return v


def seq_config(Dm: int) -> tuple[int, int, int, int]:
    """(BD, num_warps, num_stages, prefetch); MAMBA_DENSE_SEQ_CFG="BD,warps,stages[,prefetch]" overrides.

    BD is capped at next_power_of_2(Dm) (at least 8) so small D does not waste lanes.
    """
    BD, warps, stages, prefetch = 32, 1, 1, 1
    env = os.environ.get("MAMBA_DENSE_SEQ_CFG")
    if env:
        vals = [int(v) for v in env.split(",")]
        if len(vals) not in (3, 4):
            raise ValueError(f"MAMBA_DENSE_SEQ_CFG must be 'BD,warps,stages[,prefetch]', got {env!r}")
        BD, warps, stages = vals[:3]
        if len(vals) == 4:
            prefetch = vals[3]
        if BD < 1 or BD & (BD - 1) or warps < 1 or stages < 1 or prefetch not in (0, 1):
            raise ValueError(f"MAMBA_DENSE_SEQ_CFG: BD must be a power of 2, warps, stages >= 1, prefetch 0/1; got {env!r}")
    BD = min(BD, max(8, triton.next_power_of_2(Dm)))
    return BD, warps, stages, prefetch


def programs_per_sm() -> int:
    return int(os.environ.get("MAMBA_DENSE_SEQ_PROGRAMS_PER_SM", str(DEFAULT_PROGRAMS_PER_SM)))


def seq_tiles_per_chunk(n_tiles: int, programs: int, n_sm: int, override: int | None = None, rows: int = 1) -> int:
    """Tiles per chunk: split L until the launch has about MAMBA_DENSE_SEQ_PROGRAMS_PER_SM programs per SM
    (within the grid's limits: triton_scan._tiles_per_chunk with rows = batch x K)."""
    if override is None:
        target = programs_per_sm() * n_sm
        if programs < target and n_tiles >= 2:
            want_chunks = -(-target // max(1, programs))
            override = -(-n_tiles // want_chunks)
        else:
            override = n_tiles
    return _tiles_per_chunk(n_tiles, programs, n_sm, override, rows=rows)


def seq_plan(batch: int, L: int, Dm: int, N: int, K: int, S: int, dtype: torch.dtype, device,
             tiles_per_chunk: int | None = None) -> dict:
    """Launch parameters of scan_fwd_seq (also printed by benchmarks/scan.py)."""
    T = _config(N, Dm, dtype)[0]
    BD, warps, stages, prefetch = seq_config(Dm)
    n_tiles = triton.cdiv(S, T)
    n_dblk = triton.cdiv(Dm, BD)
    programs = batch * K * n_dblk
    n_sm = _num_sms(torch.device(device))
    tpc = seq_tiles_per_chunk(n_tiles, programs, n_sm, tiles_per_chunk, rows=batch * K)
    n_chunks = triton.cdiv(n_tiles, tpc)
    return dict(T=T, BD=BD, num_warps=warps, num_stages=stages, prefetch=prefetch, n_tiles=n_tiles,
                n_dblk=n_dblk, tiles_per_chunk=tpc, n_chunks=n_chunks, programs_per_launch=programs * n_chunks,
                programs_per_sm=round(programs * n_chunks / n_sm, 1))


def scan_fwd_seq(x, dt, A, B, C, D, dt_bias, route, merge: str, dt_softplus: bool, out_dtype,
                 save_states: bool = True, tiles_per_chunk: int | None = None):
    """Same contract and results as ``triton_scan.scan_fwd``: (y, states).

    Routes are always merged through the per-route buffer (MAMBA_DENSE_MERGE=serial is ignored).
    """
    x_per_route = x.dim() == 4
    batch, L, Dm = x.shape[0], x.shape[1], x.shape[-1]
    K, S = route.shape
    N = A.shape[2]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    p = seq_plan(batch, L, Dm, N, K, S, x.dtype, dev, tiles_per_chunk)
    T, BD, n_tiles, tpc, n_chunks = p["T"], p["BD"], p["n_tiles"], p["tiles_per_chunk"], p["n_chunks"]
    NP = triton.next_power_of_2(N)
    odt = out_dtype or x.dtype
    chunked = n_chunks > 1
    states, D_, bias_ = fwd_buffers(batch, K, n_tiles, N, Dm, dev, cdt, save_states or chunked, D, dt_bias)
    dummy = states
    common = dict(
        HAS_D=D is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        T=T, BD=BD, NP=NP, CT=_ct(x.dtype), X_PER_ROUTE=x_per_route,
        STAGES=p["num_stages"], PREFETCH=p["prefetch"], num_warps=p["num_warps"],
        OFF64=L * K * max(Dm, N) >= _OFF64_LIMIT,
    )
    grid = (K * p["n_dblk"], n_chunks, batch)
    if chunked:
        dsum = _empty(batch, K, n_tiles, Dm, device=dev, dtype=cdt)
        launch(_fwd_seq_kernel, grid,
            x, dt, A, B, C, D_, bias_, route, dummy, states, dsum,
            L, S, Dm, N, K, n_tiles, tpc, PHASE=1, HAS_H0=False, STORE_STATES=False, **common,
        )
        carry(states, dsum, A, n_chunks, tpc, n_tiles, Dm, N, K, reverse=False, rows=batch * K)
    cover = route_coverage(route, L)
    if merge == "none":
        bdt = odt
    else:
        bdt = odt if odt in (torch.bfloat16, torch.float32, torch.float64) else torch.float32
    out = (_empty if all(cover) else torch.zeros)(batch, L, K, Dm, device=dev, dtype=bdt)
    launch(_fwd_seq_kernel, grid,
        x, dt, A, B, C, D_, bias_, route, out, states, dummy,
        L, S, Dm, N, K, n_tiles, tpc, PHASE=0, HAS_H0=chunked, STORE_STATES=save_states, **common,
    )
    if merge == "sum":
        out = sum_routes(out, odt)
    if not save_states:
        states = states.new_empty(0)
    return out, states
