"""GPU kernel time of the selective scan, per variant: the measurement behind the A/B tables of
benchmarks/RESULTS.md from session 12 on. Until session 14 it was a session-local script
(.bench_deps/s14_kt.py); this committed form adds the options and the JSON output, and produced the
session-15 tables (H100).

To run (on a CUDA machine, from the repo root):
    python benchmarks/scan_kernels.py [--shapes S1,S2,S3,S4,S5] [--variants SPEC] [--rounds 1] [--seq]
        [--cross2d "batch,h,w,D,N;..."]

For each shape of benchmarks/scan.py (bf16 inputs) and each variant, the forward and the
forward + backward of `selective_scan` (the public op, as benchmarks/scan.py times it):
    fwdK / f+bK   the sum of the CUDA kernels' times in a torch.profiler trace of 20 calls, per call
                  (no host time in it: the measure to compare kernels by on host-bound shapes like S3)
    db            triton.testing.do_bench median (host time included, as benchmarks/scan.py)
    gerr          largest relative difference of the 7 gradients from the first variant's (bf16:
                  different channel blocks round the dB / dC partials differently, ~3e-3)
and, per variant, the time of each kernel name. --seq adds one forward + backward's kernels in launch
order (phase 1, carry, phase 3, route sum, ...).

--variants "name:KEY=VALUE|KEY=VALUE;name2:..." (default "default:"): KEY is an environment variable
(e.g. MAMBA_DENSE_SCAN_CFG=32,16,16,32,1) or "ts.NAME" for an int attribute of
mamba_dense.kernels.triton_scan read at each call (e.g. ts.TARGET_PROGRAMS_PER_SM=64); every variant
starts from the environment and attributes of the start of the run. To compare two versions of the
kernel source, run this script once per version (copy the file over kernels/triton_scan.py between
runs) and alternate the runs. Results also go to $OUT/scan_kernels.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402
import scan  # noqa: E402
from scan import kernel_profile, shape_cases  # noqa: E402


def parse_variants(spec: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for part in spec.split(";"):
        name, _, envs = part.partition(":")
        out.append((name, dict(e.split("=", 1) for e in envs.split("|") if e)))
    return out


def kernel_times(fn, grad: bool, calls: int = 20) -> tuple[float, dict[str, float]]:
    """(summed CUDA kernel ms per call, {kernel name: us per call}) from a torch.profiler trace,
    with or without autograd recording."""
    with torch.enable_grad() if grad else torch.no_grad():
        return kernel_profile(fn, calls)


def launch_sequence(fn) -> list[tuple[str, float]]:
    """One call's CUDA kernels in launch order, (name, us)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.enable_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
    return [(e.name[:40], round(e.device_time_total, 1)) for e in p.events() if e.device_type.name == "CUDA"]


def main():
    import triton

    from mamba_dense.kernels import selective_scan
    from mamba_dense.kernels import triton_scan as ts

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="S1,S2,S3,S4,S5")
    ap.add_argument("--variants", default="default:")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the variants this many times")
    ap.add_argument("--seq", action="store_true", help="also print one f+b's kernels in launch order")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cross2d", default="",
                    help='more shapes, "batch,h,w,D,N;..." (cross2d routes, bf16), run after --shapes')
    args = ap.parse_args()
    for spec in filter(None, args.cross2d.split(";")):
        b, h, w, d, n = (int(v) for v in spec.split(","))
        name = f"X b{b} {h}x{w} D{d} N{n}"
        scan.SHAPES.append((name, b, h * w, 4, d, n, ("cross2d", h, w)))
        args.shapes += "," + name + "$"

    variants = parse_variants(args.variants)
    keys = {k for _, env in variants for k in env}
    env0 = {k: os.environ.get(k) for k in keys if not k.startswith("ts.")}
    attr0 = {k[3:]: getattr(ts, k[3:]) for k in keys if k.startswith("ts.")}

    def apply(env: dict[str, str]) -> None:
        for k, v in env0.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for k, v in attr0.items():
            setattr(ts, k, v)
        for k, v in env.items():
            if k.startswith("ts."):
                setattr(ts, k[3:], int(v))
            else:
                os.environ[k] = v

    dev = torch.device("cuda")
    rows = []
    for sname, N, route, (x, dt, A, B, C, Dp, bias), ins, dy in shape_cases(args.shapes, dev, seed=3):

        def fwd():
            return selective_scan(x, dt, A, B, C, Dp, bias, route=route)

        def fwd_bwd():
            y = selective_scan(*ins, route=route)
            return torch.autograd.grad(y, ins, dy)

        ref = None
        for rnd in range(args.rounds):
            for name, env in variants:
                apply(env)
                with torch.enable_grad():
                    g = [t.float() for t in fwd_bwd()]
                if ref is None:
                    ref = g
                gerr = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g, ref))
                tf, kf = kernel_times(fwd, grad=False)
                tfb, kfb = kernel_times(fwd_bwd, grad=True)
                with torch.no_grad():
                    dbf = triton.testing.do_bench(fwd, warmup=30, rep=200, return_mode="median")
                with torch.enable_grad():
                    dbfb = triton.testing.do_bench(fwd_bwd, warmup=30, rep=200, return_mode="median")
                row = dict(shape=sname, variant=name, env=env, round=rnd, fwd_kernel_ms=tf, fwdbwd_kernel_ms=tfb,
                           fwd_do_bench_ms=dbf, fwdbwd_do_bench_ms=dbfb, grad_rel_diff=gerr, fwd_kernels_us=kf,
                           fwdbwd_kernels_us=kfb)
                label = sname if sname.startswith("X ") else f"{sname[:3]}{' N16' if N == 16 else ''}"
                print(f"{label} {name:12s} fwdK {tf:.3f} db {dbf:.3f} | "
                      f"f+bK {tfb:.3f} db {dbfb:.3f} | gerr {gerr:.1e}", flush=True)
                print("      fwd kernels (us)", kf, flush=True)
                print("      f+b kernels (us)", kfb, flush=True)
                if args.seq:
                    row["fwdbwd_sequence_us"] = launch_sequence(fwd_bwd)
                    print("      in launch order", row["fwdbwd_sequence_us"], flush=True)
                rows.append(row)
    apply({})
    _bootstrap.save_results(args.out, "scan_kernels.json", dict(rows=rows))


if __name__ == "__main__":
    main()
