"""Tile sweep of the route conv kernels at segmamba_tiny's stage sizes (CUDA machine, repo root):

    python3 benchmarks/route_conv_sweep.py [--configs 128,32,4 32,32,1 ...] [--out DIR]

For each ``tokens,channels,warps`` configuration (``MAMBA_DENSE_RCONV_CFG``) and stage (b 2,
``routes.segmamba3d``: 64^3 E 96, 32^3 E 192, 16^3 E 384, 8^3 E 768), the forward op and the backward
op (both kernels and the parameter-gradient sums) in ms (``triton.testing.do_bench`` medians), bf16.
Writes ``route_conv_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401  (mamba_dense importable without an install)

import torch  # noqa: E402

STAGES = [("stage 1", 64, 96), ("stage 2", 32, 192), ("stage 3", 16, 384), ("stage 4", 8, 768)]
CONFIGS = ["128,32,4", "32,32,1", "16,32,1", "32,16,1", "64,32,2", "32,32,2", "16,16,1", "64,16,2"]


def main(argv: list[str] | None = None) -> dict:
    import triton

    from mamba_dense.kernels import route_conv, routes

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    res = {}
    for name, g, E in STAGES:
        L = g ** 3
        route = routes.segmamba3d(g, g, g).to(dev)
        inv = routes.inverse(route, L).to(dev)
        u = torch.randn(2, L, E, device=dev).bfloat16()
        w, bias = torch.randn(3, E, 4, device=dev), torch.randn(3, E, device=dev)
        gy = torch.randn(2, L, 3, E, device=dev).bfloat16()
        line = name
        for cfg in args.configs:
            os.environ["MAMBA_DENSE_RCONV_CFG"] = cfg

            def fwd():
                route_conv._fwd_op(u, w, bias, route, inv, True)

            def bwd():
                route_conv._bwd_op(gy, u, w, bias, route, inv, True)

            fwd(), bwd()
            tf = triton.testing.do_bench(fwd, warmup=5, rep=40)
            tb = triton.testing.do_bench(bwd, warmup=5, rep=40)
            res[f"{name} {cfg}"] = dict(fwd_ms=tf, bwd_ms=tb)
            line += f" | {cfg}: {tf:.3f}/{tb:.3f}"
        print(line, flush=True)
    os.environ.pop("MAMBA_DENSE_RCONV_CFG", None)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "route_conv_sweep.json", "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=res), f, indent=1)
    return res


if __name__ == "__main__":
    main()
