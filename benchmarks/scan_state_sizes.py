"""Selective scan with more than 16 states: tiles, correctness and time (GPU).

The issue's benchmark shapes use N = 1 and N = 16; models also use larger state sizes (mamba_ssm takes
up to 256). For each N this script runs the operator under several tile configurations
(``MAMBA_DENSE_SCAN_CFG=Tf,T,BDf,BDb,warps``; "default" sets nothing, so the policy of
``triton_scan._config`` runs):

1. checks the forward and every gradient against the fp64 reference (kernels/reference.py on the GPU)
   on small shapes in fp32 and bf16, outputs poisoned with NaN (MAMBA_DENSE_POISON=1), fresh random
   inputs (seed printed), one shape with a channel count that is not a multiple of any block;
2. times forward and forward + backward at a VMamba-like stage (cross2d 56 x 56, batch 8, D 96, bf16):
   do_bench medians (host included) and the profiler's summed kernel time of one call;
3. with ``--mamba-ssm-src``, times mamba_ssm's CUDA selective_scan at the same N (its extension's fwd,
   and fwd + bwd back to back), built here as benchmarks/scan.py builds it.

    python benchmarks/scan_state_sizes.py [--Ns 32,64,128,256] [--variants "old:8,8,16,8,1;..."]
        [--mamba-ssm-src .bench_deps/mamba_ssm_selective_scan] [--out DIR]

Without --variants each N runs "default" (the policy: channel blocks divided by NP / 16 above 16 states,
one warp), "n16-tiles" (the tiles N = 16 uses, which larger N used before session 24: 8,8,16,8,1) and
"warps" (N = 16's blocks on NP / 16 warps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401  (mamba_dense importable without an install)
from scan import build_mamba_ssm, kernel_ms, make_inputs, mss_layout, reference_errors  # noqa: E402


def default_variants(N: int) -> list[tuple[str, str | None]]:
    w = max(1, (1 << (N - 1).bit_length()) // 16)
    return [
        ("default", None),
        ("n16-tiles", "8,8,16,8,1"),
        ("warps", f"8,8,16,8,{w}"),
    ]


def set_cfg(cfg: str | None):
    if cfg is None:
        os.environ.pop("MAMBA_DENSE_SCAN_CFG", None)
    else:
        os.environ["MAMBA_DENSE_SCAN_CFG"] = cfg


def check(N: int, device, gen) -> tuple[bool, list[dict]]:
    from mamba_dense.kernels import routes

    rows, ok_all = [], True
    cases = [("cross2d 24x20 D40", 2, routes.cross2d(24, 20), 40, "sum"),
             ("localmamba 9x14 D24 merge=none", 1, routes.localmamba(9, 14, ("h_flip", "w2")), 24, "none")]
    os.environ["MAMBA_DENSE_POISON"] = "1"
    try:
        for name, batch, route, D, merge in cases:
            route = route.to(device)
            K, L = route.shape[0], int(route.max()) + 1
            for dtype in (torch.float32, torch.bfloat16):
                errs = reference_errors(make_inputs(batch, L, K, D, N, dtype, device, gen), route, merge, gen)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                ok = all(e == e and e < tol for e in errs.values())
                ok_all &= ok
                rows.append(dict(case=name, dtype=str(dtype), ok=ok, **errs))
                print(f"    {'PASS' if ok else 'FAIL'} {name:32s} {str(dtype):15s} worst {max(errs.values()):.1e} "
                      f"({max(errs, key=errs.get)})", flush=True)
    finally:
        os.environ["MAMBA_DENSE_POISON"] = "0"
    return ok_all, rows


def timing(N: int, device, gen, batch: int, hw: int, D: int) -> dict:
    import triton

    from mamba_dense.kernels import routes, selective_scan

    route = routes.cross2d(hw, hw).to(device)
    K, L = route.shape[0], hw * hw
    x, dt, A, B, C, Dp, bias = make_inputs(batch, L, K, D, N, torch.bfloat16, device, gen)
    ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, Dp, bias)]
    dy = torch.randn(batch, L, D, device=device, dtype=torch.bfloat16, generator=gen)

    def fwd():
        with torch.no_grad():
            selective_scan(x, dt, A, B, C, Dp, bias, route=route)

    def fwbw():
        torch.autograd.grad(selective_scan(*ins, route=route), ins, dy)

    torch.cuda.reset_peak_memory_stats()
    fwbw()
    torch.cuda.synchronize()
    out = dict(peak_GB=torch.cuda.max_memory_allocated() / 1e9)
    out["fwd_ms"] = triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")
    out["fwdbwd_ms"] = triton.testing.do_bench(fwbw, warmup=25, rep=200, return_mode="median")
    out["fwd_kernel_ms"] = kernel_ms(fwd)
    out["fwdbwd_kernel_ms"] = kernel_ms(fwbw)
    return out


def mss_timing(mss, N: int, device, gen, batch: int, hw: int, D: int) -> dict:
    import triton

    u, de, Am, Bm, Cm, Dm_, bm = mss_layout(*make_inputs(batch, hw * hw, 4, D, N, torch.bfloat16, device, gen))

    def fwd():
        return mss.fwd(u, de, Am, Bm, Cm, Dm_, None, bm, True)

    out0, *_ = fwd()
    dout = torch.randn_like(out0)

    def fwbw():
        o, xs, *_ = fwd()
        mss.bwd(u, de, Am, Bm, Cm, Dm_, None, bm, dout, xs, None, None, True, False)

    return dict(
        fwd_ms=triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median"),
        fwdbwd_ms=triton.testing.do_bench(fwbw, warmup=25, rep=200, return_mode="median"),
        fwd_kernel_ms=kernel_ms(fwd), fwdbwd_kernel_ms=kernel_ms(fwbw),
    )


def show(r: dict):
    if "error" in r:
        print(f"N={r['N']:<4d} {r['variant']:10s} ERROR {r['error'][:100]}", flush=True)
        return
    chk = "" if "check_ok" not in r else ("check ok" if r["check_ok"] else "CHECK FAILED")
    print(f"N={r['N']:<4d} {r['variant']:10s} {r['fwd_ms']:8.3f} {r['fwdbwd_ms']:8.3f} | "
          f"{r['fwd_kernel_ms']:8.3f} {r['fwdbwd_kernel_ms']:8.3f} | {r.get('peak_GB', float('nan')):6.2f} {chk}",
          flush=True)


def save(out: str, results: list):
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "scan_state_sizes.json").write_text(json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--Ns", default="32,64,128,256")
    ap.add_argument("--variants", default="", help='"label:Tf,T,BDf,BDb,warps;label2:default;..." (all N)')
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--D", type=int, default=96)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--mamba-ssm-src", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    device = torch.device("cuda")
    seed = int(time.time()) % 100000
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  seed {seed}", flush=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    mss = build_mamba_ssm(args.mamba_ssm_src) if args.mamba_ssm_src else None
    results, ok_all = [], True
    for N in (int(v) for v in args.Ns.split(",")):
        if args.variants:
            variants = [(lab, None if cfg == "default" else cfg)
                        for lab, _, cfg in (v.partition(":") for v in args.variants.split(";"))]
        else:
            variants = default_variants(N)
        for label, cfg in variants:
            set_cfg(cfg)
            print(f"N={N} {label} ({cfg or 'policy'})", flush=True)
            row = dict(N=N, variant=label, cfg=cfg)
            try:
                if not args.no_check:
                    ok, crow = check(N, device, gen)
                    ok_all &= ok
                    row.update(check_ok=ok, check=crow)
                row.update(timing(N, device, gen, args.batch, args.hw, args.D))
            except Exception as e:  # a variant that fails to compile or run is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print("    ERROR", row["error"], flush=True)
            results.append(row)
            show(row)
            save(args.out, results)
            if "error" in row and "illegal memory access" in row["error"]:
                raise SystemExit("the CUDA context is lost; stopping")
            torch.cuda.empty_cache()
        set_cfg(None)
        if mss is not None:
            row = dict(N=N, variant="mamba_ssm", cfg=None)
            row.update(mss_timing(mss, N, device, gen, args.batch, args.hw, args.D))
            results.append(row)
            show(row)
            save(args.out, results)
    print(f"\ncross2d {args.hw}x{args.hw}, batch {args.batch}, D {args.D}, bf16; ms: do_bench fwd / f+b, "
          "kernels fwd / f+b, peak GB")
    for r in results:
        show(r)
    print("ALL CHECKS PASSED" if ok_all else "SOME CHECK FAILED")


if __name__ == "__main__":
    main()
