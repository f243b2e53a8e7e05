"""How close the N = 1 scan launches are to the time of their own memory traffic.

To run (on a CUDA machine, from the repo root):
    python benchmarks/scan_bound.py [--shapes S1,S2,S3,S5 volume 64^3 b2 N1$] [--calls 20]

For each chunk-parallel shape (bf16 inputs, N = 1, merge "sum": S2, S3, S5 N=1 of the shapes the issue's
byte-floor targets name; S1's one-pass plan is listed, not replayed), one
forward + backward of `selective_scan` is profiled and its kernels are listed in launch order. Then
each of the chunked launches is replayed by an *access-only* kernel: the same grid, tile of steps,
channel block, warps, chunks and route pairs as the plan the op built (read from its plan cache),
the same gathers through the route and the same stores, but no scan: per element one or two FMAs
keep every load live. So an access-only time is what that launch's memory traffic costs in this
design, and real / access says how far a launch is from it:
    fwd p1     phase 1: x, dt, B of every route's chunks; a state per chunk
    fwd pair   one launch per route group: x, dt, B, C, the running sum of y (read-add-written)
    bwd p1     the backward's phase 1: dt, C, dy of every route; a state per chunk
    bwd pair   x, dt, B, C, dy, the saved tile states; ddt, the dB / dC partials, dx (read-add-written)
A plain device copy of 1 GiB gives the copy rate the floors use (benchmarks/scan.py COPY_RATE).
Results also go to $OUT/scan_bound.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401
from scan import COPY_RATE, floor_bytes, profile_trace, shape_cases  # noqa: E402

from mamba_dense.kernels.triton_scan import _program_coords, _route_tok, _token_rows  # noqa: E402


@triton.jit
def _reps(PHASE: tl.constexpr, k_pair):
    """Routes a program walks: phase 1 one; a pair launch two (k_pair >= 0) or one."""
    if PHASE == 0:
        return tl.where(k_pair >= 0, 2, 1)
    return 1


@triton.jit
def _rep_route(rep, k_first, k_pair, pid_c, n_chunks, acc_in):
    """(route, chunk, whether to add to the running sum) of a program's walk rep, as the op's REPS."""
    first = rep == 0
    return (tl.where(first, k_first, k_pair), tl.where(first, pid_c, n_chunks - 1 - pid_c),
            (rep > 0) | (acc_in != 0))


@triton.jit
def _fwd_access(x_ptr, dt_ptr, B_ptr, C_ptr, route_ptr, out_ptr, st_ptr,
                L, S, Dm, K, k0, KL, n_tiles, tpc, k_pair, acc_in,
                PHASE: tl.constexpr, T: tl.constexpr, BD: tl.constexpr, SUB: tl.constexpr):
    # the op's own grid decoding (route k0 + pid0 % KL, channel block pid0 // KL, chunk, batch)
    pid_c, b64, k_first, _pid_d, d, dmask, _n, _nm, offs_t = _program_coords(k0, KL, Dm, 1, BD, 1, T)
    n_chunks = tl.cdiv(n_tiles, tpc)
    n_slots = n_tiles * SUB
    for rep in range(0, _reps(PHASE, k_pair)):
        tl.debug_barrier()
        k, chunk, add_prev = _rep_route(rep, k_first, k_pair, pid_c, n_chunks, acc_in)
        c0 = chunk * tpc
        st = ((b64 * K + k) * n_slots + c0 * SUB) * Dm + d
        acc = tl.zeros([BD], dtype=tl.float32)
        if PHASE == 0:
            acc = tl.load(st_ptr + st, mask=dmask, other=0.0)
        for c in range(c0, tl.minimum(c0 + tpc, n_tiles)):
            valid, row, rk = _token_rows(_route_tok(route_ptr, k, c * T, S, offs_t), b64, L, K, k)
            m2 = valid[:, None] & dmask[None, :]
            dtv = tl.load(dt_ptr + rk[:, None] * Dm + d[None, :], mask=m2, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + row[:, None] * Dm + d[None, :], mask=m2, other=0.0).to(tl.float32)
            Bv = tl.load(B_ptr + rk, mask=valid, other=0.0).to(tl.float32)
            if PHASE == 1:
                acc += tl.sum(dtv * xv * Bv[:, None], axis=0)
            else:
                Cv = tl.load(C_ptr + rk, mask=valid, other=0.0).to(tl.float32)
                yoff = row[:, None] * Dm + d[None, :]
                prev = tl.load(out_ptr + yoff, mask=m2 & add_prev, other=0.0).to(tl.float32)
                y = prev + (dtv * Bv[:, None] + acc[None, :]) * (xv * Cv[:, None])
                tl.store(out_ptr + yoff, y.to(out_ptr.dtype.element_ty), mask=m2)
                for j in tl.static_range(SUB):  # the states saved for the backward, one per backward tile
                    tl.store(st_ptr + ((b64 * K + k) * n_slots + c * SUB + j) * Dm + d, acc + j, mask=dmask)
        if PHASE == 1:
            tl.store(st_ptr + st, acc, mask=dmask)


@triton.jit
def _bwd_access(x_ptr, dt_ptr, B_ptr, C_ptr, route_ptr, dy_ptr, st_ptr, dx_ptr, ddt_ptr, dB_ptr, dC_ptr, g_ptr,
                batch, L, S, Dm, K, k0, KL, n_tiles, tpc, k_pair, acc_in,
                PHASE: tl.constexpr, T: tl.constexpr, BD: tl.constexpr):
    pid_c, b64, k_first, pid_d, d, dmask, _n, _nm, offs_t = _program_coords(k0, KL, Dm, 1, BD, 1, T)
    n_chunks = tl.cdiv(n_tiles, tpc)
    for rep in range(0, _reps(PHASE, k_pair)):
        tl.debug_barrier()
        k, chunk, add_prev = _rep_route(rep, k_first, k_pair, pid_c, n_chunks, acc_in)
        c0 = chunk * tpc
        g = tl.zeros([BD], dtype=tl.float32)
        c_end = tl.minimum(c0 + tpc, n_tiles)
        for ci in range(c0, c_end):
            c = c_end - 1 - (ci - c0)
            valid, row, rk = _token_rows(_route_tok(route_ptr, k, c * T, S, offs_t), b64, L, K, k)
            m2 = valid[:, None] & dmask[None, :]
            dtv = tl.load(dt_ptr + rk[:, None] * Dm + d[None, :], mask=m2, other=0.0).to(tl.float32)
            Cv = tl.load(C_ptr + rk, mask=valid, other=0.0).to(tl.float32)
            dyv = tl.load(dy_ptr + row[:, None] * Dm + d[None, :], mask=m2, other=0.0).to(tl.float32)
            if PHASE == 1:
                g += tl.sum(dtv * dyv * Cv[:, None], axis=0)
            else:
                xv = tl.load(x_ptr + row[:, None] * Dm + d[None, :], mask=m2, other=0.0).to(tl.float32)
                Bv = tl.load(B_ptr + rk, mask=valid, other=0.0).to(tl.float32)
                h0 = tl.load(st_ptr + ((b64 * K + k) * n_tiles + c) * Dm + d, mask=dmask, other=0.0)
                xoff = row[:, None] * Dm + d[None, :]
                prev = tl.load(dx_ptr + xoff, mask=m2 & add_prev, other=0.0).to(tl.float32)
                u = dtv * dyv + h0[None, :]
                tl.store(ddt_ptr + rk[:, None] * Dm + d[None, :], (u * xv).to(ddt_ptr.dtype.element_ty), mask=m2)
                boff = pid_d.to(tl.int64) * batch * L * K + rk
                tl.store(dB_ptr + boff, tl.sum(u * Cv[:, None], axis=1), mask=valid)
                tl.store(dC_ptr + boff, tl.sum(xv * Bv[:, None], axis=1), mask=valid)
                tl.store(dx_ptr + xoff, (prev + u * Bv[:, None]).to(dx_ptr.dtype.element_ty), mask=m2)
        if PHASE == 1:
            tl.store(g_ptr + ((b64 * K + k) * n_chunks + chunk) * Dm + d, g, mask=dmask)


def profile_us(fn, calls: int) -> list[tuple[str, float]]:
    """One call's CUDA kernels in launch order, (name, us): the mean over `calls` calls of a trace."""
    ev = [e for e in profile_trace(fn, calls).events() if e.device_type.name == "CUDA"]
    per = len(ev) // calls
    if per * calls != len(ev):
        raise RuntimeError(f"{len(ev)} kernels in {calls} calls: not the same sequence each call")
    return [(ev[i].name[:34], sum(ev[i + j * per].device_time_total for j in range(calls)) / calls)
            for i in range(per)]


def sweep(x, dt, B, C, kroute, dy, batch, L, S, Dm, K, fgroups, bgroups, calls):
    """Access-only pair launches (forward and backward) over tiles T x BD, warps and chunk lengths."""
    dev = x.device
    out = torch.randn(batch, L, Dm, device=dev).to(x.dtype)
    dx = torch.randn(batch, L, Dm, device=dev).to(x.dtype)
    ddt = torch.empty_like(dt)
    res = []
    print(f"{'T':>4s} {'BD':>4s} {'warps':>5s} {'steps':>5s} | {'fwd pairs us':>12s} {'bwd pairs us':>12s}")
    for T in (16, 32, 64):
        for BD in (32, 64, 128):
            for warps in (1, 2, 4):
                for steps in (64, 256):
                    if steps < T or S % steps or (T * BD) // (32 * warps) > 64:
                        continue
                    n_tiles, tpc = S // T, steps // T
                    n_chunks, n_dblk = n_tiles // tpc, triton.cdiv(Dm, BD)
                    st = torch.randn(batch, K, n_tiles, Dm, device=dev)
                    dBp = torch.empty(n_dblk, batch, L, K, device=dev)
                    dCp = torch.empty_like(dBp)
                    g = st
                    fwd = [(lambda g=g, gi=gi: _fwd_access[(n_dblk, n_chunks, batch)](
                        x, dt, B, C, kroute, out, st, L, S, Dm, K, g[0], 1, n_tiles, tpc, g[-1] if len(g) == 2 else -1,
                        int(gi > 0), PHASE=0, T=T, BD=BD, SUB=1, num_warps=warps)) for gi, g in enumerate(fgroups)]
                    bwd = [(lambda g=g, gi=gi: _bwd_access[(n_dblk, n_chunks, batch)](
                        x, dt, B, C, kroute, dy, st, dx, ddt, dBp, dCp, st, batch, L, S, Dm, K, g[0], 1, n_tiles, tpc,
                        g[-1] if len(g) == 2 else -1, int(gi > 0), PHASE=0, T=T, BD=BD, num_warps=warps))
                           for gi, g in enumerate(bgroups)]
                    f_us = sum(us for _n, us in profile_us(lambda: [f() for f in fwd], calls))
                    b_us = sum(us for _n, us in profile_us(lambda: [f() for f in bwd], calls))
                    res.append(dict(T=T, BD=BD, warps=warps, steps=steps, fwd_pairs_us=f_us, bwd_pairs_us=b_us))
                    print(f"{T:4d} {BD:4d} {warps:5d} {steps:5d} | {f_us:12.1f} {b_us:12.1f}", flush=True)
    best_f = min(res, key=lambda r: r["fwd_pairs_us"])
    best_b = min(res, key=lambda r: r["bwd_pairs_us"])
    print(f"best forward pairs: {best_f}\nbest backward pairs: {best_b}")
    return res


def main():
    from mamba_dense.kernels import selective_scan
    from mamba_dense.kernels import triton_scan as ts

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="S1,S2,S3,S5 volume 64^3 b2 N1$")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true",
                    help="also time the pair launches' access-only kernels over other tiles (T, BD, warps, steps "
                         "per chunk): can another layout move the same bytes faster?")
    args = ap.parse_args()
    dev = torch.device("cuda")

    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    ms = triton.testing.do_bench(lambda: dst.copy_(buf), warmup=50, rep=300, return_mode="median")
    rate = 2 * buf.numel() / (ms * 1e-3)
    print(f"copy 1 GiB: {ms:.3f} ms, {rate / 1e12:.2f} TB/s (read + write; the floors use {COPY_RATE / 1e12:.1f})")
    del buf, dst
    rows = []
    for name, N, route, inputs, leaves, dy in shape_cases(args.shapes, dev, 1234):
        if N != 1:
            continue
        x, dt, A, B, C, Dp, bias = leaves
        batch, L, Dm = x.shape
        K, S = route.shape
        ts._FWD_PLANS.clear()
        ts._BWD_PLANS.clear()

        def fb():
            for t in leaves:
                t.grad = None
            selective_scan(x, dt, A, B, C, Dp, bias, route=route).backward(dy)

        seq = profile_us(fb, args.calls)
        (pf,), (pb,) = ts._FWD_PLANS.values(), ts._BWD_PLANS.values()
        real = [us for _n, us in seq]
        print(f"\n{name}: one forward + backward, kernels in launch order (us): "
              + ", ".join(f"{n.split('(')[0]} {us:.1f}" for n, us in seq))
        if not (pf.chunked and pb.chunked):
            # one-pass plans (S1: the per-route buffer and its route sum) have other launches: not replayed
            print("one-pass plan (no phase 1): not replayed")
            rows.append(dict(shape=name, sequence=seq))
            continue
        kroute = route.to(torch.int32).contiguous()
        xd, dtd, Bd, Cd, dyd = (t.detach() for t in (x, dt, B, C, dy))
        T1, BD1, w1 = pf.meta1["T"], pf.meta1["BD"], pf.meta1["num_warps"]
        n_tiles, tpc, n_chunks, n_dblk = pf.n_tiles, pf.tpc, pf.n_chunks, pf.n_dblk
        st = torch.randn(batch, K, pf.n_slots, Dm, device=dev)
        out = torch.randn(batch, L, Dm, device=dev).to(xd.dtype)
        launches = {}
        launches["fwd p1"] = [lambda: _fwd_access[(K * n_dblk, n_chunks, batch)](
            xd, dtd, Bd, Cd, kroute, out, st, L, S, Dm, K, 0, K, n_tiles, tpc, 0, 0,
            PHASE=1, T=T1, BD=BD1, SUB=pf.SUB, num_warps=w1)]
        launches["fwd pairs"] = [
            (lambda g=g, gi=gi: _fwd_access[(n_dblk, n_chunks, batch)](
                xd, dtd, Bd, Cd, kroute, out, st, L, S, Dm, K, g[0], 1, n_tiles, tpc, g[-1] if len(g) == 2 else -1,
                int(gi > 0), PHASE=0, T=T1, BD=BD1, SUB=pf.SUB, num_warps=w1))
            for gi, g in enumerate(pf.groups or ())]
        Tb, BDb, wb = pb.meta1["T"], pb.meta1["BD"], pb.meta1["num_warps"]
        nt_b, tpc_b, nch_b, ndb = pb.n_tiles, pb.tpc, pb.n_chunks, pb.n_dblk
        stb = torch.randn(batch, K, nt_b, Dm, device=dev)
        gb = torch.empty(batch, K, nch_b, Dm, device=dev)
        dx = torch.randn(batch, L, Dm, device=dev).to(xd.dtype)
        ddt = torch.empty_like(dtd)
        dBp = torch.empty(ndb, batch, L, K, device=dev)
        dCp = torch.empty_like(dBp)
        launches["bwd p1"] = [lambda: _bwd_access[(K * ndb, nch_b, batch)](
            xd, dtd, Bd, Cd, kroute, dyd, stb, dx, ddt, dBp, dCp, gb, batch, L, S, Dm, K, 0, K, nt_b, tpc_b, 0, 0,
            PHASE=1, T=Tb, BD=BDb, num_warps=wb)]
        launches["bwd pairs"] = [
            (lambda g=g, gi=gi: _bwd_access[(ndb, nch_b, batch)](
                xd, dtd, Bd, Cd, kroute, dyd, stb, dx, ddt, dBp, dCp, gb, batch, L, S, Dm, K, g[0], 1, nt_b, tpc_b,
                g[-1] if len(g) == 2 else -1, int(gi > 0), PHASE=0, T=Tb, BD=BDb, num_warps=wb))
            for gi, g in enumerate(pb.groups or ())]
        acc_us = {}
        for key, fns in launches.items():
            if not fns:
                continue
            tim = profile_us(lambda fns=fns: [f() for f in fns], args.calls)
            acc_us[key] = [us for _n, us in tim]
        # the real launches, by position: fwd [p1, carry, groups...], bwd [p1, carry, groups..., sums]
        nf = len(pf.groups or ())
        nb = len(pb.groups or ())
        names = [n for n, _u in seq]
        i1 = names.index(next(n for n in names if n.startswith("_fwd_kernel")))
        real_map = {"fwd p1": real[i1:i1 + 1], "fwd pairs": real[i1 + 2:i1 + 2 + nf]}
        i0 = i1 + 2 + nf
        # the backward's phase 1 is its first _bwd_kernel
        ib = next(i for i in range(i0, len(names)) if names[i].startswith("_bwd_kernel"))
        real_map["bwd p1"] = real[ib:ib + 1]
        real_map["bwd pairs"] = real[ib + 2:ib + 2 + nb]
        fb_floor, fbb_floor = floor_bytes(batch, L, K, Dm, N)
        print(f"{'launch':10s} {'real us':>9s} {'access us':>10s} {'real/acc':>8s}")
        row = dict(shape=name, sequence=seq, copy_TBps=rate / 1e12, fwd_floor_us=fb_floor / COPY_RATE * 1e6,
                   fb_floor_us=fbb_floor / COPY_RATE * 1e6, fwd_tiles=(T1, BD1, w1, tpc, n_chunks),
                   bwd_tiles=(Tb, BDb, wb, tpc_b, nch_b), launches={})
        for key in launches:
            if key not in acc_us:
                continue
            r, a = sum(real_map[key]), sum(acc_us[key])
            row["launches"][key] = dict(real_us=real_map[key], access_us=acc_us[key])
            print(f"{key:10s} {r:9.1f} {a:10.1f} {r / a:8.2f}")
        fwd_real = sum(real[:i0])  # the forward's kernels (and any fill before them)
        print(f"forward kernels {fwd_real:.1f} us (floor {row['fwd_floor_us']:.1f}); forward + backward kernels "
              f"{sum(real):.1f} us (floor {row['fb_floor_us']:.1f})")
        if args.sweep and pf.groups and pb.groups:
            row["sweep"] = sweep(xd, dtd, Bd, Cd, kroute, dyd, batch, L, S, Dm, K, pf.groups, pb.groups, args.calls)
        rows.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "scan_bound.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
