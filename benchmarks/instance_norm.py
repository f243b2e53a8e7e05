"""Fused instance norm + activation (``mamba_dense.kernels.instance_norm``) against PyTorch's group_norm.

To run (CUDA machine, repo root):
    python3 benchmarks/instance_norm.py [--out results_dir]

1. Correctness: outputs and the gradients of x, weight and bias against an fp64 reference
   (``torch.group_norm`` with one group per channel + the activation), relative Frobenius error
   (fp32 < 1e-4, bf16 < 2e-2), NCDHW and channels_last_3d, fresh random non-zero inputs, outputs
   poisoned with NaN (``MAMBA_DENSE_POISON=1``) so unwritten elements show.
2. Speed: forward and forward+backward ms (``triton.testing.do_bench`` medians) on the shapes of
   the 3D models at 128^3, batch 2, bf16, against what the models ran before: ``torch.group_norm``
   + activation under bf16 autocast (group_norm runs in fp32 there: cast in, fp32 out).

Writes ``instance_norm.json`` to ``--out`` (default $OUT, else the current folder).
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

# (name, shape, affine, act): the norms of segmamba_tiny + UNet3D at 128^3, batch 2
SHAPES = [
    ("decoder stride 1 (32 ch, 128^3)", (2, 32, 128, 128, 128), True, "leaky_relu"),
    ("GSC stage 1 (48 ch, 64^3)", (2, 48, 64, 64, 64), False, "relu"),
    ("decoder stride 2 (48 ch, 64^3)", (2, 48, 64, 64, 64), True, "none"),
    ("GSC stage 2 (96 ch, 32^3)", (2, 96, 32, 32, 32), False, "relu"),
    ("stage 4 (384 ch, 8^3)", (2, 384, 8, 8, 8), True, "leaky_relu"),
]
CHECKS = [((2, 5, 9, 10, 11), True, "leaky_relu"), ((1, 3, 1, 1, 1), True, "relu"), ((2, 48, 64, 64, 64), False, "relu"),
          ((2, 384, 8, 8, 8), True, "none"), ((1, 7, 33, 17, 5), False, "leaky_relu")]


def reference(x, w, b, eps, act):
    y = torch.group_norm(x, x.shape[1], w, b, eps)
    if act == "relu":
        return F.relu(y)
    if act == "leaky_relu":
        return F.leaky_relu(y, 0.01)
    return y


def inputs(shape, affine, dtype, cl, dev, gen):
    x = (torch.randn(shape, device=dev, generator=gen) * 2 + 3).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    C = shape[1]
    w = (torch.rand(C, device=dev, generator=gen) + 0.5) if affine else None
    b = torch.randn(C, device=dev, generator=gen) if affine else None
    return x, w, b


def rel(a, r):
    # absolute below a norm of 1e-6: e.g. dx of a single voxel per channel is 0 in exact arithmetic
    return ((a.double() - r).norm() / r.norm().clamp_min(1e-6)).item()


def check(dev, gen) -> list[dict]:
    from mamba_dense.kernels.instance_norm import instance_norm_act

    os.environ["MAMBA_DENSE_POISON"] = "1"
    rows = []
    try:
        for shape, affine, act in CHECKS:
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
                for cl in (False, True):
                    x, w, b = inputs(shape, affine, dtype, cl, dev, gen)
                    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
                    xx, ww, bb = leaves[0], *(leaves[1:] if affine else (None, None))
                    y = instance_norm_act(xx, ww, bb, 1e-5, act)
                    dy = torch.randn(y.shape, device=dev, generator=gen).to(dtype)
                    if act != "none":  # no upstream gradient at the kink, where fp32 and fp64 may disagree on the side
                        pre = torch.group_norm(x.double(), shape[1], *(None if t is None else t.double() for t in (w, b)))
                        dy = torch.where(pre.abs() < 1e-4, torch.zeros_like(dy), dy)
                    g = torch.autograd.grad(y, leaves, dy)
                    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
                    rx, rw, rb = ref_leaves[0], *(ref_leaves[1:] if affine else (None, None))
                    yr = reference(rx, rw, rb, 1e-5, act)
                    gr = torch.autograd.grad(yr, ref_leaves, dy.double())
                    errs = [rel(y, yr)] + [rel(a, r) for a, r in zip(g, gr)]
                    finite = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(t).all()) for t in g)
                    same_fmt = y.is_contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
                    ok = finite and same_fmt and max(errs) < tol
                    rows.append(dict(shape=list(shape), affine=affine, act=act, dtype=str(dtype), channels_last=cl,
                                     errors=errs, ok=ok))
                    print(f"check {str(shape):22s} {act:10s} {str(dtype):15s} cl={cl!s:5s} max rel err "
                          f"{max(errs):.2e} {'ok' if ok else 'FAIL'}", flush=True)
    finally:
        os.environ.pop("MAMBA_DENSE_POISON", None)
    return rows


def bench(dev, gen) -> list[dict]:
    import triton

    from mamba_dense.kernels.instance_norm import instance_norm_act

    rows = []
    for name, shape, affine, act in SHAPES:
        for cl in (False, True):
            x, w, b = inputs(shape, affine, torch.bfloat16, cl, dev, gen)
            dy = torch.randn(shape, device=dev, generator=gen).to(torch.bfloat16)
            leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
            ww, bb = (leaves[1], leaves[2]) if affine else (None, None)

            def ours():
                return instance_norm_act(leaves[0], ww, bb, 1e-5, act)

            def torch_autocast():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return reference(leaves[0], ww, bb, 1e-5, act)

            r = dict(name=name, shape=list(shape), act=act, channels_last=cl)
            for label, fn in (("ours", ours), ("torch", torch_autocast)):
                with torch.no_grad():
                    r[f"{label}_fwd_ms"] = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

                def fb(fn=fn):
                    torch.autograd.grad(fn(), leaves, dy)

                r[f"{label}_fwdbwd_ms"] = triton.testing.do_bench(fb, warmup=10, rep=50, return_mode="median")
            rows.append(r)
            print(f"{name:34s} cl={cl!s:5s} fwd ours {r['ours_fwd_ms']:7.3f} torch {r['torch_fwd_ms']:7.3f} | "
                  f"f+b ours {r['ours_fwdbwd_ms']:7.3f} torch {r['torch_fwdbwd_ms']:7.3f} ms "
                  f"({r['torch_fwdbwd_ms'] / r['ours_fwdbwd_ms']:.1f}x)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--no-bench", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(int.from_bytes(os.urandom(4), "little"))
    checks = check(dev, gen)
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "checks": checks}
    print("CHECK " + ("PASSED" if all(c["ok"] for c in checks) else "FAILED"), flush=True)
    if not args.no_bench:
        result["bench"] = bench(dev, gen)
    out = Path(args.out or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "instance_norm.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
