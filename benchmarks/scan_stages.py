"""The scan as segmamba_tiny calls it, timed per encoder stage (CUDA machine, repo root):

    python3 benchmarks/scan_stages.py [--stages 1 2 3] [--out DIR]

``selective_scan`` with one input per route (x of shape (b, L, K, E), as after RouteMamba's route
conv), merge="none", bf16 inputs and fp32 A / D / dt_bias, b 2, K 3 (``routes.segmamba3d``), N 16, at
the stage sizes of a 128^3 input: stage 1 64^3 with E 96, stage 2 32^3 with E 192, stage 3 16^3 with
E 384. Prints forward+backward and backward-alone ms (``triton.testing.do_bench`` medians) and writes
``scan_stages.json``. For A/B comparisons of kernel changes: run it once per variant in one session.
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

STAGES = {1: (64, 96), 2: (32, 192), 3: (16, 384), 4: (8, 768)}  # grid side, E


def main(argv: list[str] | None = None) -> dict:
    import triton

    from mamba_dense.kernels import routes, selective_scan

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    res = {}
    for st in args.stages:
        g, E = STAGES[st]
        K, L, N, b = 3, g ** 3, 16, 2
        route = routes.segmamba3d(g, g, g).to(dev)

        def r(*s, sc=1.0):
            return torch.randn(*s, generator=gen, device=dev) * sc

        x, dt = r(b, L, K, E).bfloat16(), (r(b, L, K, E, sc=0.5) - 1).bfloat16()
        B, C = r(b, L, K, N).bfloat16(), r(b, L, K, N).bfloat16()
        A, Dp, bias = -torch.exp(r(K, E, N, sc=0.5)), r(K, E), r(K, E, sc=0.3)
        ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, Dp, bias)]
        y = selective_scan(*ins, route=route, merge="none")
        gy = r(*y.shape).bfloat16()

        def fwd_bwd():
            torch.autograd.grad(selective_scan(*ins, route=route, merge="none"), ins, gy)

        def bwd():
            torch.autograd.grad(y, ins, gy, retain_graph=True)

        fwd_bwd(), bwd()
        res[f"stage{st}"] = dict(L=L, E=E, fb_ms=triton.testing.do_bench(fwd_bwd, warmup=5, rep=60),
                                 bwd_ms=triton.testing.do_bench(bwd, warmup=5, rep=60))
        print(f"stage {st} ({g}^3, E {E}): f+b {res[f'stage{st}']['fb_ms']:7.3f} ms, "
              f"backward {res[f'stage{st}']['bwd_ms']:7.3f} ms", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "scan_stages.json", "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, stages=res), f, indent=1)
    return res


if __name__ == "__main__":
    main()
