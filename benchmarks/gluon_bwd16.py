"""Experiment (session 23, not adopted): the N=16 backward's gradient pass written in Gluon, Triton's
explicit-layout language, against the `tl` kernel the op runs (triton_scan._bwd_kernel).

The idea: the `tl` backward leaves the [T, NP, BD] tile's layout to the compiler, which spreads the
(state, channel) pairs over the lanes; its loop is about 41 thread instructions per element (offline
SASS, session 21) where the arithmetic needs about 14. Here each thread holds all T steps of NPT
states of one channel: the scans run in registers (the reverse one as flip -> scan -> flip, since
associative_scan(reverse=True) reverses lanes with shuffles even along an in-thread axis: 920 SHFL per
tile), the sums over the states take log2(16 / NPT) shuffle rounds, and the channel sums go through
shared memory (RED=1: a layout conversion that puts the channels in registers) or shuffles (RED=0).
It computes the same gradients (checked against the op's backward below, small odd shapes included).

Measured on the H100 (torch 2.11, triton 3.6), S4 (b32, L 3136, K 4, D 192, N 16), kernel ms of the
gradient pass: the `tl` kernel 2.84; Gluon NPT=4 / 8 / 2 at 8.8 / 8.5 / 16.5 (no register cap),
NPT=4 capped at 168 registers 5.97. Nsight Compute (NPT=4, cap 168): 0.34 instructions issued per
cycle and scheduler against the `tl` kernel's 0.61, 8.5 cycles between a warp's instructions of which
5.4 wait on L1TEX (each thread's per-step 2-byte gathers of x, dt, dy and the register spills: 98 M
local-memory requests). Offline SASS (triton 3.8): 48 / 40 thread instructions per element for NPT=4 /
8 (255 registers, spills), against the `tl` kernel's 41: the layout removes the lane shuffles but the
per-(step, channel) work repeats on every state lane, the per-thread gathers are scalar, and the
associative scans keep their dead decay products (1.75 FMUL per element). S5 N=16 (288 channels over
262,144 steps) needs the chunk-parallel passes this prototype does not have: 237 ms.

To run (on a CUDA machine, from the repo root):
    python benchmarks/gluon_bwd16.py [--shapes S4,S5N16] [--variants "NPT,W,RED,MAXNREG;..."]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language.standard as _tl_standard
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401
from scan import kernel_profile, make_inputs  # noqa: E402

from mamba_dense.kernels import routes  # noqa: E402
from mamba_dense.kernels import triton_scan as ts  # noqa: E402

# tl.flip for Gluon (reshape of the axis to (2, ..., 2) and xor swaps: register renames when the axis
# lies in one thread); associative_scan(reverse=True) reverses lanes with shuffles even then
_g_flip = gluon.jit(_tl_standard.flip.fn)


# the `tl` kernel's helpers and scan operators, compiled as Gluon functions (as tl.flip above): ex2.approx.ftz,
# softplus and sigmoid from one exp(-|v|), the forward and the reverse-segment combines
_g_ex2 = gluon.jit(ts._ex2_ftz.fn)
_g_softplus_sigmoid = gluon.jit(ts._softplus_sigmoid_fast.fn)
_g_combine = gluon.jit(ts._combine.fn)
_g_combine_seg = gluon.jit(ts._combine_seg.fn)


@gluon.jit
def _bwd16_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, route_ptr, states_ptr, dy_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, p_ptr,
    batch, L, S, Dm, N, K, n_tiles,
    HAS_D: gl.constexpr, HAS_BIAS: gl.constexpr, SOFTPLUS: gl.constexpr,
    T: gl.constexpr, NP: gl.constexpr, BD: gl.constexpr,
    L3: gl.constexpr, L3R: gl.constexpr, RED: gl.constexpr,
):
    LTD: gl.constexpr = gl.SliceLayout(1, L3)  # (T, BD)
    LTN: gl.constexpr = gl.SliceLayout(2, L3)  # (T, NP)
    LND: gl.constexpr = gl.SliceLayout(0, L3)  # (NP, BD)
    pid0 = gl.program_id(0)
    b64 = gl.program_id(2).to(gl.int64)
    k = pid0 % K
    pid_d = pid0 // K
    t_td = gl.arange(0, T, layout=gl.SliceLayout(1, LTD))
    d_td = pid_d * BD + gl.arange(0, BD, layout=gl.SliceLayout(0, LTD))
    t_tn = gl.arange(0, T, layout=gl.SliceLayout(1, LTN))
    n_tn = gl.arange(0, NP, layout=gl.SliceLayout(0, LTN))
    n_nd = gl.arange(0, NP, layout=gl.SliceLayout(1, LND))
    d_nd = pid_d * BD + gl.arange(0, BD, layout=gl.SliceLayout(0, LND))
    dmask_td = d_td < Dm
    dmask_nd = d_nd < Dm
    nd_mask = gl.expand_dims(n_nd < N, 1) & gl.expand_dims(dmask_nd, 0)
    st_off = gl.expand_dims(n_nd, 1) * Dm + gl.expand_dims(d_nd, 0)
    A = gl.load(A_ptr + (k * Dm + gl.expand_dims(d_nd, 0)) * N + gl.expand_dims(n_nd, 1), mask=nd_mask,
                other=0.0).to(gl.float32)
    A2 = A * 1.4426950408889634
    A3 = gl.expand_dims(A, 0)
    A23 = gl.expand_dims(A2, 0)
    bias = gl.zeros([BD], gl.float32, layout=gl.SliceLayout(0, LTD))
    if HAS_BIAS:
        bias = gl.load(bias_ptr + k * Dm + d_td, mask=dmask_td, other=0.0).to(gl.float32)
    Dv = gl.zeros([BD], gl.float32, layout=gl.SliceLayout(0, LTD))
    if HAS_D:
        Dv = gl.load(D_ptr + k * Dm + d_td, mask=dmask_td, other=0.0).to(gl.float32)
    st_base = (b64 * K + k) * n_tiles
    t3 = gl.expand_dims(gl.expand_dims(t_td, 1), 1)  # (T, 1, 1) in L3
    first = t3 == 0
    last = t3 == T - 1
    gA = gl.zeros([NP, BD], gl.float32, layout=LND)
    dA_acc = gl.zeros([NP, BD], gl.float32, layout=LND)
    dD_acc = gl.zeros([T, BD], gl.float32, layout=LTD)
    dbias_acc = gl.zeros([T, BD], gl.float32, layout=LTD)
    ones3 = gl.full([T, NP, BD], 1.0, gl.float32, layout=L3)
    bc_base = pid_d.to(gl.int64) * batch * L * K * N
    for ci in range(0, n_tiles):
        c = n_tiles - 1 - ci
        s_td = c * T + t_td
        tok = gl.load(route_ptr + k * S + s_td, mask=s_td < S, other=-1)
        valid = tok >= 0
        row = b64.to(tok.dtype) * L + gl.where(valid, tok, 0)
        rk = row * K + k
        s_tn = c * T + t_tn
        tok_n = gl.load(route_ptr + k * S + s_tn, mask=s_tn < S, other=-1)
        valid_n = tok_n >= 0
        rk_n = (b64.to(tok_n.dtype) * L + gl.where(valid_n, tok_n, 0)) * K + k
        m2 = gl.expand_dims(valid, 1) & gl.expand_dims(dmask_td, 0)
        mn = gl.expand_dims(valid_n, 1) & gl.expand_dims(n_tn < N, 0)
        dtr = gl.load(dt_ptr + gl.expand_dims(rk, 1) * Dm + gl.expand_dims(d_td, 0), mask=m2, other=0.0)
        xr = gl.load(x_ptr + gl.expand_dims(row, 1) * Dm + gl.expand_dims(d_td, 0), mask=m2, other=0.0)
        dyr = gl.load(dy_ptr + gl.expand_dims(row, 1) * Dm + gl.expand_dims(d_td, 0), mask=m2, other=0.0)
        bc_off = gl.expand_dims(rk_n, 1) * N + gl.expand_dims(n_tn, 0)
        Br = gl.load(B_ptr + bc_off, mask=mn, other=0.0)
        Cr = gl.load(C_ptr + bc_off, mask=mn, other=0.0)
        h0 = gl.load(states_ptr + (st_base + c) * N * Dm + st_off, mask=nd_mask, other=0.0)
        smask = s_td < S
        pre = dtr.to(gl.float32)
        if HAS_BIAS:
            pre = pre + gl.expand_dims(bias, 0)
        if SOFTPLUS:
            delta, sig = _g_softplus_sigmoid(pre)
        else:
            delta = pre
            sig = pre
        delta = gl.where(gl.expand_dims(smask, 1), delta, 0.0)
        xv = xr.to(gl.float32)
        dyv = dyr.to(gl.float32)
        B3 = gl.expand_dims(Br.to(gl.float32), 2)
        C3 = gl.expand_dims(Cr.to(gl.float32), 2)
        dy3 = gl.expand_dims(dyv, 1)
        delta3 = gl.expand_dims(delta, 1)
        dxd3 = gl.expand_dims(delta * xv, 1)  # delta x per (step, channel)
        a = _g_ex2(delta3 * A23)
        e = C3 * dy3
        e = gl.where(last, e + gl.expand_dims(gA, 0), e)
        _f, _q, v = gl.associative_scan((_g_flip(a, 0), ones3, _g_flip(e, 0)), 0, _g_combine_seg)
        dh = _g_flip(v, 0)
        gA = gl.sum(gl.where(first, a * dh, 0.0), axis=0)
        u = B3 * dxd3
        _ac, h_all = gl.associative_scan((a, gl.where(first, u + a * gl.expand_dims(h0, 0), u)), 0, _g_combine)
        # a_s h_{s-1}, exactly 0 where a_s underflows (as _bwd_route_chunk's hprev_a)
        w = dh * gl.where(a > 0.0, h_all - B3 * dxd3, 0.0)
        sB = gl.sum(dh * B3, axis=1)  # sum_n dh B: dx = delta sB + D dy, and x sB is ddelta's B x term
        dxv = delta * sB + gl.expand_dims(Dv, 0) * dyv
        ddelta = gl.sum(A3 * w, axis=1) + xv * sB
        dA_acc += gl.sum(w * delta3, axis=0)
        pB = dh * dxd3
        pC = h_all * dy3
        if RED == 1:
            pB = gl.convert_layout(pB, L3R)
            pC = gl.convert_layout(pC, L3R)
        dBv = gl.convert_layout(gl.sum(pB, axis=2), LTN)
        dCv = gl.convert_layout(gl.sum(pC, axis=2), LTN)
        if HAS_D:
            dD_acc += dyv * xv
        if SOFTPLUS:
            dpre = ddelta * sig
        else:
            dpre = ddelta
        dpre = gl.where(gl.expand_dims(smask, 1) & gl.expand_dims(dmask_td, 0), dpre, 0.0)
        if HAS_BIAS:
            dbias_acc += dpre
        off_td = gl.expand_dims(rk, 1) * Dm + gl.expand_dims(d_td, 0)
        gl.store(ddt_ptr + off_td, dpre.to(ddt_ptr.dtype.element_ty), mask=m2)
        gl.store(dx_ptr + off_td, dxv.to(dx_ptr.dtype.element_ty), mask=m2)
        gl.store(dB_ptr + bc_base + bc_off, dBv.to(dB_ptr.dtype.element_ty), mask=mn)
        gl.store(dC_ptr + bc_base + bc_off, dCv.to(dC_ptr.dtype.element_ty), mask=mn)
    # partial parameter gradients (b, 1, K, N + 2, D) as _bwd_kernel's (one chunk)
    pk = (b64 * K + k) * (N + 2) * Dm
    gl.store(p_ptr + pk + st_off, dA_acc, mask=nd_mask)
    if HAS_D:
        gl.store(p_ptr + pk + N * Dm + d_td, gl.sum(dD_acc, axis=0), mask=dmask_td)
    if HAS_BIAS:
        gl.store(p_ptr + pk + (N + 1) * Dm + d_td, gl.sum(dbias_acc, axis=0), mask=dmask_td)


def layouts(T: int, NP: int, NPT: int, W: int):
    """(L3, L3R, BD): the compute layout (each thread: T steps x NPT states x 1 channel; NP // NPT
    lanes on the states, the rest on the channels, W warps on the channels) and the layout the channel
    sums are taken in (RED=1: channels in registers)."""
    TN = NP // NPT
    TD = 32 // TN
    BD = TD * W
    L3 = gl.BlockedLayout([T, NPT, 1], [1, TN, TD], [1, 1, W], [2, 1, 0])
    # T * NP (step, state) pairs over 32 * W threads; channels in registers
    pairs = T * NP
    per = max(1, pairs // (32 * W))
    # per thread: `per` pairs along the states, BD channels
    npt_r = min(per, NP)
    tn_r = NP // npt_r
    tt_r = 32 // tn_r if tn_r <= 32 else 1
    L3R = gl.BlockedLayout([1, npt_r, BD], [tt_r, tn_r, 1], [W, 1, 1], [2, 1, 0])
    return L3, L3R, BD


def gradients(dy, x, dt, A, B, C, D, dt_bias, route32, states, dt_softplus: bool, T: int, NPT: int = 8, W: int = 1,
              red: int = 1, dxbuf=None, maxnreg: int = 0):
    """The gradient pass for merge "sum" over all routes, dx per route in dxbuf (b, L, K, D); returns
    (dxbuf, ddt, dBp, dCp, pp) as scan_bwd's routes path builds them."""
    batch, L, Dm = x.shape
    K, S = route32.shape
    N = A.shape[2]
    NP = triton.next_power_of_2(N)
    L3, L3R, BD = layouts(T, NP, NPT, W)
    n_dblk = triton.cdiv(Dm, BD)
    n_tiles = triton.cdiv(S, T)
    dev = x.device
    if dxbuf is None:
        dxbuf = torch.empty(batch, L, K, Dm, device=dev, dtype=torch.float32)
    ddt = torch.empty_like(dt)
    pdt = torch.bfloat16 if B.dtype == torch.bfloat16 else torch.float32
    dBp = torch.empty(n_dblk, batch, L, K, N, device=dev, dtype=pdt)
    dCp = torch.empty(n_dblk, batch, L, K, N, device=dev, dtype=pdt)
    pp = torch.empty(batch, 1, K, N + 2, Dm, device=dev, dtype=torch.float32)
    dummy = states
    _bwd16_kernel[(K * n_dblk, 1, batch)](
        x, dt, A, B, C, D if D is not None else dummy, dt_bias if dt_bias is not None else dummy, route32, states, dy,
        dxbuf, ddt, dBp, dCp, pp,
        batch, L, S, Dm, N, K, n_tiles,
        D is not None, dt_bias is not None, dt_softplus, T, NP, BD, L3, L3R, red,
        num_warps=W, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return dxbuf, ddt, dBp, dCp, pp


dev = torch.device("cuda") if torch.cuda.is_available() else None
OUT = os.environ.get("OUT", "/tmp")
VARIANTS: list = []
results = []


def gluon_bwd(dy, x, dt, A, B, C, Dp, bias, route, states, NPT, W, red, mr=0, T=8):
    """The op's backward for merge "sum" with the Gluon gradient pass and the op's own sums."""
    batch, L, Dm = x.shape
    K, S = route.shape
    N = A.shape[2]
    kr = ts._kernel_route(route, batch * L * K * max(Dm, N))
    dxbuf, ddt, dBp, dCp, pp = gradients(dy, x, dt, A, B, C, Dp, bias, kr, states, True, T, NPT, W, red, maxnreg=mr)
    dx = ts.sum_routes(dxbuf, x.dtype)
    dB, dC = ts.sum_blocks2(dBp, B.dtype, dCp, C.dtype)
    dA, dD, dbias = ts.sum_params(pp.view(batch, K * (N + 2) * Dm), K, N, Dm, A.dtype, Dp.dtype, bias.dtype)
    return dx, ddt, dA, dB, dC, dD, dbias


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def case(name, batch, L, K, D, N, route, timing):
    """Gradients of every variant against the op's backward (bf16 inputs: both round dx, ddt and the
    dB / dC partials to bf16, so they differ by a few 1e-3), and with timing the kernel ms of both."""
    gen = torch.Generator(device=dev).manual_seed(7)
    x, dt, A, B, C, Dp, bias = make_inputs(batch, L, K, D, N, torch.bfloat16, dev, gen)
    dy = torch.randn(batch, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
    y, states = ts.scan_fwd(x, dt, A, B, C, Dp, bias, route, "sum", True, torch.bfloat16)
    ref = ts.scan_bwd(dy, x, dt, A, B, C, Dp, bias, route, states, "sum", True)
    torch.cuda.synchronize()
    row = {"shape": name}
    if timing:
        t, per = kernel_profile(lambda: ts.scan_bwd(dy, x, dt, A, B, C, Dp, bias, route, states, "sum", True), 10)
        row["tl_bwd_ms"], row["tl_kernels"] = round(t, 4), per
        print(f"{name}: tl backward {t:.3f} ms  {per}", flush=True)
    for NPT, W, red, mr in VARIANTS:
        tag = f"  {name}: gluon NPT={NPT} W={W} RED={red} maxnreg={mr}:"
        try:
            got = gluon_bwd(dy, x, dt, A, B, C, Dp, bias, route, states, NPT, W, red, mr)
            torch.cuda.synchronize()
            errs = [rel(g, r) for g, r in zip(got, ref)]
            v = {"var": (NPT, W, red, mr), "errs": errs, "ok": max(errs) < 2e-2}
            if timing:
                t, per = kernel_profile(
                    lambda: gluon_bwd(dy, x, dt, A, B, C, Dp, bias, route, states, NPT, W, red, mr), 10)
                v["ms"], v["kernels"] = round(t, 4), per
            print(f"{tag} {'OK' if v['ok'] else 'MISMATCH'} errs {[f'{e:.1e}' for e in errs]} "
                  f"{v.get('ms', '')} {v.get('kernels', '')}", flush=True)
        except Exception as ex:  # a variant that fails to compile (e.g. too many registers) is reported
            v = {"var": (NPT, W, red, mr), "error": repr(ex)[:2000]}
            print(f"{tag} ERROR {repr(ex)[:1500]}", flush=True)
        row.setdefault("gluon", []).append(v)
    results.append(row)


def main():
    global VARIANTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="S4")
    ap.add_argument("--variants", default="4,1,1,0;4,1,1,168;8,1,1,0;8,1,0,0;2,1,1,128")
    args = ap.parse_args()
    VARIANTS = [tuple(int(v) for v in s.split(",")) for s in args.variants.split(";")]
    SHAPES = args.shapes.split(",")
    # small odd cases first (correctness): padded route, D not a multiple of the block, N 12, L not a multiple of T
    case("small cross2d 5x7 D40 N16", 3, 35, 4, 40, 16, routes.cross2d(5, 7).to(dev), False)
    r = routes.stack(routes.window(6, 5, 4), routes.flip(routes.window(6, 5, 4, column_first=True))).to(dev)
    case("small window 6x5 s4 D24 N12", 2, 30, r.shape[0], 24, 12, r, False)
    if "S4" in SHAPES:
        case("S4", 32, 3136, 4, 192, 16, routes.cross2d(56, 56).to(dev), True)
    if "S5N16" in SHAPES:
        case("S5N16", 2, 262144, 3, 48, 16, routes.segmamba3d(64, 64, 64).to(dev), True)
    json.dump(results, open(os.path.join(OUT, "gluon_bwd16.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
