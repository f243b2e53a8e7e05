"""Memory kept by the scan's per-route caches when every call brings a fresh route tensor.

The caches (route value check, coverage / int32 copy, device copies of CPU routes) must hold routes
weakly: 200 calls with a fresh 2 MiB route kept 400 MiB alive before session 26 (benchmarks/RESULTS.md).

To run (repo root; a CUDA machine, or the CPU with --device cpu):
    python3 benchmarks/route_cache_memory.py
"""

from __future__ import annotations

import argparse
import gc
import weakref

import torch

import mamba_dense.kernels as mk
from mamba_dense.kernels import routes, selective_scan
from mamba_dense.kernels import triton_scan as ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=65536)
    args = ap.parse_args()
    dev, L, K, D = args.device, args.tokens, 4, 8
    x, dt = torch.randn(1, L, D, device=dev), torch.randn(1, L, K, D, device=dev)
    A, B = -torch.rand(K, D, 1, device=dev), torch.randn(1, L, K, 1, device=dev)
    ok = True
    cases = ["selective_scan, a route made on the device"] + (["routes.to_device of a CPU route"] if dev != "cpu" else [])
    for what in cases:
        made = []  # weak references to every route made
        for _ in range(args.calls):
            r = torch.arange(L, device=dev if what.startswith("selective") else "cpu").repeat(K, 1)  # new each call
            made.append(weakref.ref(r))
            if what.startswith("selective"):
                selective_scan(x, dt, A, B, B, route=r)
            else:
                routes.to_device(r, dev)
            del r
        gc.collect()
        alive = sum(ref() is not None for ref in made)
        kept = alive * L * K * 8 / 2**20
        ok &= alive == 0
        gpu = f", GPU memory allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB" if dev == "cuda" else ""
        print(f"{what}: {alive} of {args.calls} fresh {L * K * 8 / 2**20:.0f} MiB routes still alive ({kept:.0f} MiB){gpu}; "
              f"cache entries: range check {len(mk._RANGE_CACHE)}, route info {len(ts._ROUTE_INFO)}, "
              f"device copies {len(routes._DEVICE_CACHE)}")
    print("LEAK CHECK PASSED" if ok else "LEAK CHECK FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
