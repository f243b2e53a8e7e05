"""Tile-shape sweep for the scan kernels (forward, forward+backward) on the benchmark shapes.

To run (CUDA machine, repo root): python benchmarks/scan_tune.py [--out DIR]
Prints one line per (shape, T, BD, warps, programs/SM) with medians and register/spill counts.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401

import torch  # noqa: E402
import triton  # noqa: E402

from scan import SHAPES, floor_bytes, make_inputs, COPY_RATE  # noqa: E402
from mamba_dense.kernels import routes, selective_scan  # noqa: E402
from mamba_dense.kernels import triton_scan as ts  # noqa: E402


def kernel_stats():
    out = {}
    for name, fn in (("fwd", ts._fwd_kernel), ("bwd", ts._bwd_kernel)):
        try:
            caches = fn.device_caches
            for dev, entry in caches.items():
                cache = entry[0]
                for key, k in cache.items():
                    out.setdefault(name, []).append((k.n_regs, k.n_spills, k.metadata.num_warps))
        except Exception as e:  # version differences
            out[name] = str(e)
    return out


def main():
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    sweeps = {
        # (T, BD forward, BD backward, warps), or (T forward, T backward, BD forward, BD backward, warps);
        # MAMBA_DENSE_SCAN_CFG turns _wide_block off, so the first N=1 entry is the default tiles with
        # blocks of 16 everywhere
        1: [(32, 16, 16, 16, 1), (32, 16, 16, 32, 1), (32, 16, 16, 1), (32, 16, 16, 2), (16, 16, 16, 1)],
        16: [(8, 16, 8, 1), (8, 16, 16, 1), (16, 16, 8, 2)],
    }
    rows = []
    only = sys.argv[1:] and sys.argv[1] == "--quick"
    for name, batch, L, K, D, N, rdesc in SHAPES:
        if not name.startswith(("S1", "S2", "S3", "S4", "S5")):
            continue
        route = getattr(routes, rdesc[0])(*rdesc[1:]).to(dev)
        x, dt, A, B, C, Dp, bias = make_inputs(batch, L, K, D, N, torch.bfloat16, dev, gen)
        fb, fbb = floor_bytes(batch, L, K, D, N)
        dy = torch.randn(batch, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
        for cfg in sweeps[N]:
            for pps in (4,):
                os.environ["MAMBA_DENSE_SCAN_CFG"] = ",".join(map(str, cfg))
                ts.MIN_PROGRAMS_PER_SM = pps
                try:
                    with torch.no_grad():
                        tf = triton.testing.do_bench(lambda: selective_scan(x, dt, A, B, C, Dp, bias, route=route),
                                                     warmup=20, rep=100, return_mode="median")
                    ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, Dp, bias)]

                    def fwbw():
                        y = selective_scan(*ins, route=route)
                        torch.autograd.grad(y, ins, dy)

                    tfb = triton.testing.do_bench(fwbw, warmup=20, rep=100, return_mode="median")
                except Exception as e:
                    print(f"{name} {cfg} pps={pps} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                r = dict(shape=name, cfg=cfg, pps=pps, fwd_ms=tf, fwdbwd_ms=tfb,
                         fwd_x_floor=tf / (fb / COPY_RATE * 1e3), fwdbwd_x_floor=tfb / (fbb / COPY_RATE * 1e3))
                rows.append(r)
                print(f"{name:26s} cfg={cfg} pps={pps:2d}  fwd {tf:7.3f} ms ({r['fwd_x_floor']:5.1f}x)"
                      f"  f+b {tfb:7.3f} ms ({r['fwdbwd_x_floor']:5.1f}x)", flush=True)
        del x, dt, B, C, dy
        torch.cuda.empty_cache()
    stats = kernel_stats()
    print("regs/spills/warps:", json.dumps(stats)[:3000])
    out = Path(os.environ.get("OUT", "."))
    (out / "tune.json").write_text(json.dumps({"rows": rows, "stats": stats}, indent=1, default=str))


if __name__ == "__main__":
    main()
