"""Fused route conv + SiLU (``mamba_dense.kernels.route_conv``) against the PyTorch path.

To run (CUDA machine, repo root):
    python3 benchmarks/route_conv.py [--out results_dir] [--no-bench]

1. Correctness at real sizes: output and the gradients of u, weight and bias against the PyTorch
   path (``seq_mixer.route_conv1d`` + SiLU + transpose) in fp64, relative Frobenius error (fp32 <
   1e-4, bf16 < 2e-2), fresh random inputs, outputs poisoned with NaN (``MAMBA_DENSE_POISON=1``).
2. Speed: forward and forward+backward ms (``triton.testing.do_bench`` medians), bf16, against
   what RouteMamba ran before (the PyTorch path: gather, mask, F.conv1d, gather back, SiLU,
   transpose to (B, L, K, E)), on the shapes of SegMamba's ToM layers at 128^3 and Vim-S at 224.

Writes ``route_conv.json`` to ``--out`` (default $OUT, else the current folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401  (mamba_dense importable without an install)

from mamba_dense.kernels import route_conv, routes  # noqa: E402
from mamba_dense.layers.seq_mixer import route_conv1d  # noqa: E402

# (name, batch, route builder, E): SegMamba-tiny ToM layers (E = 2 x dim) at 128^3 input, Vim-S
SHAPES = [
    ("SegMamba stage 1 (64^3, E=96)", 2, lambda: routes.segmamba3d(64, 64, 64), 96),
    ("SegMamba stage 2 (32^3, E=192)", 2, lambda: routes.segmamba3d(32, 32, 32), 192),
    ("Vim-S 224 b64 (197 tok, E=768)", 64, lambda: routes.bidirectional(197), 768),
]
CHECKS = [
    ("segmamba3d 16^3 E=40", 2, lambda: routes.segmamba3d(16, 16, 16), 40),
    ("localmamba 13x11 padded E=24", 3, lambda: routes.localmamba(13, 11, ("w2", "h_flip", "w7", "v_flip")), 24),
    ("cross2d 31x17 E=33", 1, lambda: routes.cross2d(31, 17), 33),
]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def _torch_path(u, w, b, route, inv, has_pad, covers):
    return F.silu(route_conv1d(u, w, b, route, inv, has_pad=has_pad, covers=covers)).transpose(1, 2).contiguous()


def _inputs(batch, L, K, E, dtype, dev, gen):
    big = torch.randn(batch, L, 2 * E, device=dev, generator=gen).to(dtype)
    u = big[..., :E]  # strided, as in RouteMamba
    w = torch.randn(K, E, 4, device=dev, generator=gen) * 0.5
    b = torch.randn(K, E, device=dev, generator=gen) * 0.1
    return u, w, b


def _route(rb, dev):
    """(route on dev, K, L, inv, has_pad, covers) of a route builder."""
    route = rb().to(dev)
    L = int(route.max()) + 1
    inv = routes.inverse(route, L)
    return route, route.shape[0], L, inv, bool((route < 0).any()), bool((inv >= 0).all())


def check(dev) -> list[dict]:
    os.environ["MAMBA_DENSE_POISON"] = "1"
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, batch, rb, E in CHECKS:
        route, K, L, inv, has_pad, covers = _route(rb, dev)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            u, w, b = _inputs(batch, L, K, E, dtype, dev, gen)
            leaves = [t.detach().requires_grad_() for t in (u, w, b)]
            y = route_conv.route_conv1d_fused(*leaves, route, inv)
            dy = torch.randn(y.shape, device=dev, generator=gen).to(dtype)
            grads = torch.autograd.grad(y, leaves, dy)
            ref = [t.detach().double().requires_grad_() for t in (u, w, b)]
            y_ref = _torch_path(*ref, route, inv, has_pad, covers)
            g_ref = torch.autograd.grad(y_ref, ref, dy.double())
            errs = {"y": _rel(y, y_ref), **{k: _rel(g, r) for k, g, r in zip(("du", "dw", "db"), grads, g_ref)}}
            ok = all(v < tol for v in errs.values()) and torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
            rows.append(dict(case=name, dtype=str(dtype), ok=bool(ok), **errs))
            print(f"check {name:32s} {str(dtype):15s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                  + (" ok" if ok else " FAIL"), flush=True)
    os.environ["MAMBA_DENSE_POISON"] = "0"
    return rows


def bench(dev) -> list[dict]:
    import triton

    gen = torch.Generator(device=dev).manual_seed(1)
    rows = []
    for name, batch, rb, E in SHAPES:
        route, K, L, inv, has_pad, covers = _route(rb, dev)
        u, w, b = _inputs(batch, L, K, E, torch.bfloat16, dev, gen)
        dy = torch.randn(batch, L, K, E, device=dev, generator=gen).to(torch.bfloat16)
        paths = {"fused": lambda *a: route_conv.route_conv1d_fused(*a, route, inv),
                 "pytorch": lambda *a: _torch_path(*a, route, inv, has_pad, covers)}
        r = dict(shape=name)
        for pname, fn in paths.items():
            with torch.no_grad():
                r[f"{pname}_fwd_ms"] = triton.testing.do_bench(lambda: fn(u, w, b), warmup=10, rep=50)
            leaves = [t.detach().requires_grad_() for t in (u, w, b)]

            def fb():
                torch.autograd.grad(fn(*leaves), leaves, dy)

            r[f"{pname}_fwdbwd_ms"] = triton.testing.do_bench(fb, warmup=10, rep=50)
        rows.append(r)
        print(f"{name:34s} fwd {r['fused_fwd_ms']:7.3f} vs {r['pytorch_fwd_ms']:7.3f} ms | "
              f"f+b {r['fused_fwdbwd_ms']:7.3f} vs {r['pytorch_fwdbwd_ms']:7.3f} ms", flush=True)
        del u, w, b, dy
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--no-bench", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "check": check(dev)}
    print("CHECK PASSED" if all(r["ok"] for r in res["check"]) else "CHECK FAILED", flush=True)
    if not args.no_bench:
        res["bench"] = bench(dev)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "route_conv.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
