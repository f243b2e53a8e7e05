"""Would two CUDA streams help the chunk-parallel scan? A phase-1 launch (bound by its instructions)
run beside a pair launch (bound by its gathers) on a second stream, against the two in sequence.

To run (on a CUDA machine, from the repo root):
    python benchmarks/scan_overlap.py [--shapes S2,S3,S5 volume 64^3 b2 N1$] [--reps 50]

Within one forward, route group 2's phase 1 does not depend on group 1's outputs, so it could run
while group 1's pair launch writes them (and likewise in the backward). Before restructuring the
launches per group, this measures what such overlap can give at all: the op's own kernels, taken
from its plan cache, launched as (a) phase 1 then the first pair launch on one stream, (b) the same
two on two streams at equal priority, (c) phase 1 on a high-priority stream. The buffers are
separate, so the launches are independent (their results are not used). us per pair of launches,
median of --reps rounds timed with CUDA events; also the two launches alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401
from scan import shape_cases  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median us of fn() (its launches on the current stream and any it joins back)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3)
    return statistics.median(out)


def variants(first, second, reps: int) -> dict[str, float]:
    """first (phase 1) and second (a pair launch): alone, in sequence, on two streams."""
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side_hi = torch.cuda.Stream(priority=-1)

    def two(s):
        def fn():
            s.wait_stream(main)
            with torch.cuda.stream(s):
                first()
            second()
            main.wait_stream(s)
        return fn

    return dict(first=timed(first, reps), second=timed(second, reps),
                sequence=timed(lambda: (first(), second()), reps),
                two_streams=timed(two(side), reps), phase1_high_priority=timed(two(side_hi), reps))


def main():
    from mamba_dense.kernels import selective_scan
    from mamba_dense.kernels import triton_scan as ts

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="S2,S3,S5 volume 64^3 b2 N1$")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = []
    for name, N, route, (x, dt, A, B, C, Dp, bias), leaves, dy in shape_cases(args.shapes, torch.device("cuda"), 5):
        batch, L, Dm = x.shape
        K, S = route.shape
        ts._FWD_PLANS.clear()
        ts._BWD_PLANS.clear()
        y = selective_scan(*leaves, route=route)
        torch.autograd.grad(y, leaves, dy)
        (pf,), (pb,) = ts._FWD_PLANS.values(), ts._BWD_PLANS.values()
        if not (pf.chunked and pf.groups):
            print(f"{name}: not a chunk-parallel pair plan, skipped")
            continue
        kroute = ts._kernel_route(route, batch * L * K * max(Dm, N))
        dev = x.device
        st1 = torch.randn(batch, K, pf.n_slots, N, Dm, device=dev)
        st0 = torch.randn_like(st1)
        dsum = torch.randn(batch, K, pf.n_slots, Dm, device=dev)
        out = torch.randn(batch, L, Dm, device=dev).to(x.dtype)
        g0 = pf.groups[0]
        nd, nc, nt, tpc = pf.n_dblk, pf.n_chunks, pf.n_tiles, pf.tpc
        f1 = lambda: ts.launch(ts._fwd_kernel, (K * nd, nc, batch),  # noqa: E731
                               x, dt, A, B, C, Dp, bias, kroute, st1, st1, st1, dsum,
                               L, S, Dm, N, K, 0, K, nt, tpc, 0, 0, **pf.meta1)
        f0 = lambda: ts.launch(ts._fwd_kernel, (nd, nc, batch),  # noqa: E731
                               x, dt, A, B, C, Dp, bias, kroute, out, st0, st0, st0,
                               L, S, Dm, N, K, g0[0], 1, nt, tpc, g0[-1] if len(g0) == 2 else -1, 0,
                               **dict(pf.meta3, MODE=5, REPS=2))
        fwd = variants(f1, f0, args.reps)
        res = [("forward", fwd)]
        rows.append(dict(shape=name, forward=fwd))
        if pb.chunked and pb.groups:
            res.append(("backward", backward(x, dt, A, B, C, Dp, bias, kroute, dy, pb, batch, L, S, Dm, N, K, args.reps)))
            rows[-1]["backward"] = res[-1][1]
        for what, r in res:
            print(f"{name[:6]} {what:8s} phase 1 {r['first']:7.1f} | pair launch {r['second']:7.1f} | "
                  f"sequence {r['sequence']:7.1f} | two streams {r['two_streams']:7.1f} | "
                  f"phase 1 high priority {r['phase1_high_priority']:7.1f}", flush=True)
    _bootstrap.save_results(args.out, "scan_overlap.json", dict(rows=rows))


def backward(x, dt, A, B, C, Dp, bias, kroute, dy, pb, batch, L, S, Dm, N, K, reps):
    from mamba_dense.kernels import triton_scan as ts

    dev = x.device
    nd, nc, nt, tpc = pb.n_dblk, pb.n_chunks, pb.n_tiles, pb.tpc
    g0 = pb.groups[0]
    stb = torch.randn(batch, K, nt, N, Dm, device=dev)
    gbuf = torch.randn(batch, K, nc, N, Dm, device=dev)
    gsum = torch.randn(batch, K, nc, Dm, device=dev)
    gbuf0, gsum0 = torch.randn_like(gbuf), torch.randn_like(gsum)
    ddt1, ddt0 = torch.empty_like(dt), torch.empty_like(dt)
    dBp1 = torch.empty(nd, batch, L, K, N, device=dev, dtype=pb.dBp_dtype)
    dCp1 = torch.empty(nd, batch, L, K, N, device=dev, dtype=pb.dCp_dtype)
    dBp0, dCp0 = torch.empty_like(dBp1), torch.empty_like(dCp1)
    pp1 = torch.empty(batch, nc, K, N + 2, Dm, device=dev)
    pp0 = torch.empty_like(pp1)
    dx = torch.randn_like(x)
    b1 = lambda: ts.launch(ts._bwd_kernel, (K * nd, nc, batch),  # noqa: E731
                           x, dt, A, B, C, Dp, bias, kroute, stb, dy,
                           stb, stb, ddt1, dBp1, dCp1, pp1, pp1, pp1, gbuf, gsum,
                           batch, L, S, Dm, N, K, 0, K, nt, tpc, nc, 0, 0, **pb.meta1)
    b0 = lambda: ts.launch(ts._bwd_kernel, (nd, nc, batch),  # noqa: E731
                           x, dt, A, B, C, Dp, bias, kroute, stb, dy,
                           dx, stb, ddt0, dBp0, dCp0, pp0, pp0, pp0, gbuf0, gsum0,
                           batch, L, S, Dm, N, K, g0[0], 1, nt, tpc, nc, g0[-1] if len(g0) == 2 else -1, 0,
                           **pb.meta_pairs)
    return variants(b1, b0, reps)


if __name__ == "__main__":
    main()
