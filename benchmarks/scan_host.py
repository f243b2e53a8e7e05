"""Host time of the selective scan: where a small shape's forward + backward spends its CPU time.

To run (on a CUDA machine, from the repo root):
    python benchmarks/scan_host.py [--shapes S3,S2] [--calls 40]

For each shape of benchmarks/scan.py (bf16 inputs), the host time per call of:
    empty launch      an empty Triton kernel (the floor of one launch)
    triton fwd / bwd  kernels/triton_scan.scan_fwd / scan_bwd called directly
    autograd floor    an autograd.Function over the same seven inputs that launches nothing (its forward
                      allocates the output, its backward the seven gradients): what the autograd
                      engine and the allocations alone cost per forward + backward
    public f+b        selective_scan forward + torch.autograd.grad, through the eager
                      autograd.Function ("function", the default) and through the registered
                      custom ops (MAMBA_DENSE_SCAN_EAGER=op)
"host ms" is the time to issue `--calls` calls without a sync; "host+drain" adds the final
torch.cuda.synchronize(). When the two agree the host is the bottleneck (the GPU waits on it).
Then triton.testing.do_bench medians of the public forward + backward on both paths, alternated
twice (the same measurement as benchmarks/scan.py --bench). Results also go to
$OUT/scan_host.json. --cprofile N: also run the public forward + backward N times under cProfile
and print the 30 functions with the most own time (where the host time goes, by Python function).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402
from scan import shape_cases  # noqa: E402


def host_time(fn, calls: int) -> tuple[float, float]:
    """(host ms per call, host + drain ms per call) over `calls` calls after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e3, (t2 - t0) / calls * 1e3


def main():
    import triton

    from mamba_dense.kernels import selective_scan
    from mamba_dense.kernels import triton_scan as ts

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="S3,S2")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cprofile", type=int, default=0, help="profile this many public f+b calls")
    args = ap.parse_args()
    dev = torch.device("cuda")

    @triton.jit
    def _empty_kernel(p, n):
        pass

    class _Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *ts_in):
            ctx.save_for_backward(*ts_in)
            return torch.empty_like(ts_in[0])

        @staticmethod
        def backward(ctx, g):
            return tuple(torch.empty_like(t) for t in ctx.saved_tensors)

    buf = torch.empty(1, device=dev)
    rows = []
    print(f"{'shape':28s} {'what':22s} {'host ms':>8s} {'host+drain':>10s}", flush=True)
    for name, _, route, (x, dt, A, B, C, Dp, bias), ins, dy in shape_cases(args.shapes, dev, seed=7):
        _, states = ts.scan_fwd(x, dt, A, B, C, Dp, bias, route, "sum", True, torch.bfloat16)  # for "triton bwd"

        def fwbw():
            y = selective_scan(*ins, route=route)
            torch.autograd.grad(y, ins, dy)

        def with_path(path, fn):
            def run():
                old = os.environ.get("MAMBA_DENSE_SCAN_EAGER")
                os.environ["MAMBA_DENSE_SCAN_EAGER"] = path
                try:
                    fn()
                finally:
                    if old is None:
                        os.environ.pop("MAMBA_DENSE_SCAN_EAGER")
                    else:
                        os.environ["MAMBA_DENSE_SCAN_EAGER"] = old
            return run

        cases = [
            ("empty launch", lambda: _empty_kernel[(1,)](buf, 1)),
            ("triton fwd", lambda: ts.scan_fwd(x, dt, A, B, C, Dp, bias, route, "sum", True, torch.bfloat16)),
            ("triton bwd", lambda: ts.scan_bwd(dy, x, dt, A, B, C, Dp, bias, route, states, "sum", True)),
            ("autograd floor", lambda: torch.autograd.grad(_Floor.apply(*ins), ins, dy)),
            ("public f+b (function)", with_path("function", fwbw)),
            ("public f+b (op)", with_path("op", fwbw)),
        ]
        for what, fn in cases:
            h, hd = host_time(fn, args.calls)
            rows.append(dict(shape=name, what=what, host_ms=h, host_drain_ms=hd))
            print(f"{name:28s} {what:22s} {h:8.3f} {hd:10.3f}", flush=True)
        if args.cprofile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.cprofile):
                fwbw()
            prof.disable()
            torch.cuda.synchronize()
            print(f"cProfile, {args.cprofile} public f+b calls of {name}:", flush=True)
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        for rep in range(2):
            for path in ("function", "op"):
                t = triton.testing.do_bench(with_path(path, fwbw), warmup=50, rep=300, return_mode="median")
                rows.append(dict(shape=name, what=f"do_bench f+b ({path})", rep=rep, ms=t))
                print(f"{name:28s} do_bench f+b ({path:8s}) {t:8.3f} ms", flush=True)
        del x, dt, B, C, ins, dy, states
        torch.cuda.empty_cache()
    _bootstrap.save_results(args.out, "scan_host.json", {"rows": rows})


if __name__ == "__main__":
    main()
