"""The segmentation loss at full resolution: literal resize + cross-entropy vs the fused Triton op.

To run (CUDA machine, repo root):
    python benchmarks/loss.py [--batch 16] [--size 512] [--classes 150] [--out DIR]

Cases: UPerNet's main head (logits at 1/4) and its auxiliary FCN head (1/16), bf16 logits in
channels_last as the heads produce them under autocast, 10% ignored pixels. Variants:
- ``literal``: ``F.interpolate`` (fp32 under autocast) + the task's deterministic ``cross_entropy``;
- ``literal-F``: ``F.interpolate`` + ``F.cross_entropy`` (PyTorch's own, not deterministic on CUDA);
- ``fused ...``: ``upsampled_cross_entropy``, default and other kernel configurations.
Prints forward and forward+backward ms (``triton.testing.do_bench``), peak memory above the inputs,
and each fused variant's relative error vs the literal fp32 computation (loss and gradient).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mamba_dense.tasks import _upsample_ce  # noqa: E402
from mamba_dense.tasks._losses import cross_entropy  # noqa: E402

FUSED = {  # name: CONFIG overrides (fwd / grad: pixels per program, classes per block, warps)
    "fused (default)": {},
    "fused fwd 64x64 w4": dict(fwd=(64, 64, 4)),
    "fused fwd 64x32 w2": dict(fwd=(64, 32, 2)),
    "fused fwd 256x32 w8": dict(fwd=(256, 32, 8)),
    "fused grad 64x64 w4": dict(grad=(64, 64, 4)),
    "fused grad 128x32 w4": dict(grad=(128, 32, 4)),
    "fused grad 32x32 w2": dict(grad=(32, 32, 2)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from triton.testing import do_bench

    dev = torch.device("cuda")
    B, S, C = args.batch, args.size, args.classes
    g = torch.Generator(device=dev).manual_seed(0)
    target = torch.randint(0, C, (B, S, S), device=dev, generator=g)
    target[torch.rand(target.shape, device=dev, generator=g) < 0.1] = 255
    base_cfg = dict(_upsample_ce.CONFIG)
    rows = []
    for head, down in (("main 1/4", 4), ("aux 1/16", 16)):
        logits = (2 * torch.randn(B, C, S // down, S // down, device=dev, generator=g)).to(torch.bfloat16)
        logits = logits.contiguous(memory_format=torch.channels_last).requires_grad_()

        def literal(ce=cross_entropy):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                up = F.interpolate(logits, size=(S, S), mode="bilinear", align_corners=False)
                return ce(up, target, ignore_index=255)

        # reference for the error columns: literal, all in fp32 from the same bf16 logits
        lf = logits.detach().float().requires_grad_()
        ref = F.cross_entropy(F.interpolate(lf, size=(S, S), mode="bilinear", align_corners=False), target, ignore_index=255)
        (ref_g,) = torch.autograd.grad(ref, lf)
        variants = {"literal": lambda: literal(), "literal-F": lambda: literal(F.cross_entropy)}
        for name, cfg in FUSED.items():
            variants[name] = (lambda cfg=cfg: (_upsample_ce.CONFIG.update({**base_cfg, **cfg}),
                                                _upsample_ce.upsampled_cross_entropy(logits, target, ignore_index=255))[1])
        for name, fn in variants.items():
            if args.only and not any(t in name for t in args.only.split(",")):
                continue
            row = dict(head=head, variant=name)
            try:
                loss = fn()
                (gr,) = torch.autograd.grad(loss, logits)
                row["loss_rel_err"] = abs(float(loss.detach()) - float(ref)) / abs(float(ref))
                row["grad_rel_err"] = float((gr.float() - ref_g).norm() / ref_g.norm())
                del loss, gr
                torch.cuda.synchronize()
                row["fwd_ms"] = do_bench(lambda: fn().detach(), warmup=5, rep=50)
                row["fwd_bwd_ms"] = do_bench(lambda: torch.autograd.grad(fn(), logits), warmup=5, rep=50)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                torch.autograd.grad(fn(), logits)
                torch.cuda.synchronize()
                row["peak_extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            except Exception as e:  # report and go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            if "error" in row:
                print(f"{head:9s} {name:40s} ERROR {row['error']}", flush=True)
            else:
                print(f"{head:9s} {name:40s} fwd {row['fwd_ms']:7.3f} ms  f+b {row['fwd_bwd_ms']:7.3f} ms  "
                      f"peak +{row['peak_extra_GiB']:.2f} GiB  err loss {row['loss_rel_err']:.1e} grad {row['grad_rel_err']:.1e}",
                      flush=True)
        _upsample_ce.CONFIG.update(base_cfg)
    _bootstrap.save_results(args.out, "loss.json", {"rows": rows})


if __name__ == "__main__":
    main()
