"""Very large state sizes on the GPU: does the scan run, and does it match the fp64 reference?

To run (repo root, a CUDA machine):
    python3 benchmarks/scan_state_limit.py --Ns 512,1024,1025,2048 --dtypes float32,bfloat16,float64

For each N and dtype: a cross2d 8 x 8 scan at batch 1 with 8 channels, forward and the gradients of the
output's sum for x, dt, A, B, C, against selective_scan_ref in fp64 on the same (rounded) values; relative
errors, or the exception and its message (above kernels.MAX_TRITON_STATE the op raises a ValueError).
Each case runs in its own process (--one), so a failed launch cannot poison the next.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401
from scan import rel  # noqa: E402


def one(N: int, dtype: torch.dtype) -> str:
    from mamba_dense.kernels import routes, selective_scan, selective_scan_ref

    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    route = routes.cross2d(8, 8).cuda()
    K, L, Dm = route.shape[0], 64, 8
    r = lambda *s, sc=1.0: torch.randn(*s, generator=g, device="cuda") * sc  # noqa: E731
    vals = [r(1, L, Dm), r(1, L, K, Dm, sc=0.5), -torch.rand(K, Dm, N, generator=g, device="cuda") - 0.5,
            r(1, L, K, N), r(1, L, K, N)]
    vals = [v.to(dtype) for v in vals]
    ins = [v.clone().requires_grad_() for v in vals]
    t0 = time.time()
    try:
        y = selective_scan(*ins, route=route)
        grads = torch.autograd.grad(y.sum(), ins)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the point is to report it
        return f"N={N} {dtype}: FAILED after {time.time() - t0:.1f} s: {type(e).__name__}: {str(e)[:300]}"
    ref = [v.double().requires_grad_() for v in vals]
    y_ref = selective_scan_ref(*ref, route=route)
    g_ref = torch.autograd.grad(y_ref.sum(), ref)
    errs = [rel(y.detach(), y_ref.detach())] + [rel(a, b) for a, b in zip(grads, g_ref)]
    names = ("y", "dx", "ddt", "dA", "dB", "dC")
    return (f"N={N} {dtype}: ran in {time.time() - t0:.1f} s (compilation included); relative errors "
            + " ".join(f"{n}={e:.1e}" for n, e in zip(names, errs)) + f"; worst {max(errs):.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--Ns", default="512,1024,1025,2048")
    ap.add_argument("--dtypes", default="float32,bfloat16,float64")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per case")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # "N,dtype": run one case here
    args = ap.parse_args()
    if args.one:
        n, d = args.one.split(",")
        print(one(int(n), getattr(torch, d)), flush=True)
        return
    for n in args.Ns.split(","):
        for d in args.dtypes.split(","):
            try:
                out = subprocess.run([sys.executable, __file__, "--one", f"{n},{d}"], capture_output=True, text=True,
                                     timeout=args.timeout)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("N=")]
                print(lines[-1] if lines else f"N={n} {d}: no result (rc {out.returncode}): {out.stderr[-300:]}",
                      flush=True)
            except subprocess.TimeoutExpired:
                print(f"N={n} {d}: no result within {args.timeout} s", flush=True)


if __name__ == "__main__":
    main()
