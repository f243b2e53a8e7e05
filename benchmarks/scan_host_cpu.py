"""Host time of the scan's Python path on a machine without a GPU: every kernel launch stubbed out.

To run (any machine, from the repo root):
    python benchmarks/scan_host_cpu.py [--shape S3|S4] [--profile fwd|fwbw|bwd]

The op's Triton path runs on CPU tensors (MAMBA_DENSE_TRITON_CPU=1 with TRITON_INTERPRET=1 select it)
with triton_scan's launch sites replaced by no-ops, the SM count fixed at 132 and programmatic dependent
launch off, so what is timed is the Python around the kernels: input checks, plans, allocations and the
autograd machinery. CPU allocations of the scan's buffers cost more than the CUDA caching allocator's,
and the H100's host ran about three times slower than this one per Python call (benchmarks/RESULTS.md,
session 23), so compare variants here, not absolute numbers with benchmarks/scan_host.py. Best of 7 x
200 calls per case: the public forward under no_grad, the public forward + torch.autograd.grad, and
triton_scan.scan_fwd / scan_bwd called directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["MAMBA_DENSE_TRITON_CPU"] = "1"
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401
from scan import make_inputs  # noqa: E402


def main():
    import mamba_dense.kernels.triton_scan as ts
    from mamba_dense.kernels import routes, selective_scan

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="S3", choices=("S3", "S4"))
    ap.add_argument("--profile", default="", choices=("", "fwd", "fwbw", "bwd"),
                    help="also 2000 calls of one case under cProfile")
    args = ap.parse_args()
    ts._run = lambda site, fn, grid, a, meta: None
    ts._launch_all = ts._run
    ts._num_sms = lambda dev: 132
    ts._pdl_on = lambda dev: 0
    gen = torch.Generator().manual_seed(0)
    batch, L, K, D, N = (1, 65536, 4, 96, 1) if args.shape == "S3" else (32, 3136, 4, 192, 16)
    side = int(L ** 0.5)
    x, dt, A, B, C, Dp, bias = make_inputs(batch, L, K, D, N, torch.bfloat16, torch.device("cpu"), gen)
    route = routes.cross2d(side, side)
    ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, Dp, bias)]
    dy = torch.randn(batch, L, D, dtype=torch.bfloat16, generator=gen)
    _, states = ts.scan_fwd(x, dt, A, B, C, Dp, bias, route, "sum", True, torch.bfloat16)

    def fwbw():
        torch.autograd.grad(selective_scan(*ins, route=route), ins, dy)

    def fwd():
        with torch.no_grad():
            selective_scan(x, dt, A, B, C, Dp, bias, route=route)

    cases = {
        "fwd": ("public forward, no_grad", fwd),
        "fwbw": ("public forward + backward", fwbw),
        "scan_fwd": ("triton_scan.scan_fwd", lambda: ts.scan_fwd(x, dt, A, B, C, Dp, bias, route, "sum", True,
                                                                 torch.bfloat16)),
        "bwd": ("triton_scan.scan_bwd", lambda: ts.scan_bwd(dy, x, dt, A, B, C, Dp, bias, route, states, "sum", True)),
    }
    for label, fn in cases.values():
        for _ in range(20):
            fn()
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            best = min(best, (time.perf_counter() - t0) / 200 * 1e6)
        print(f"{args.shape} {label:28s} {best:7.1f} us", flush=True)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        fn = cases[args.profile][1]
        prof.enable()
        for _ in range(2000):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
