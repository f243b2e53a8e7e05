"""Does a model's training step run under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs)?

    python3 benchmarks/cudagraph_check.py [--model vmamba_tiny] [--batch 8] [--size 224]

Runs a few bf16 training steps of a timm classifier under reduce-overhead and prints the full
traceback of the first failure (an operation that cannot be captured: a host copy, a sync), or
the step time and whether CUDA graphs were used (torch._inductor counters).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vmamba_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    import timm

    import mamba_dense.encoders  # noqa: F401
    from torch._dynamo.utils import counters

    dev = torch.device("cuda")
    model = timm.create_model(args.model, num_classes=1000).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x[:2])  # eager warm-up: routes cached on the device
    fwd = torch.compile(model, dynamic=False, mode="reduce-overhead")
    for i in range(args.steps):
        t = time.perf_counter()
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        except Exception:
            print(f"step {i} failed:", flush=True)
            traceback.print_exc()
            sys.exit(1)
        print(f"step {i}: {1e3 * (time.perf_counter() - t):.1f} ms, loss {loss.item():.3f}", flush=True)
    print("inductor counters:", {k: dict(v) for k, v in counters.items() if "cudagraph" in k or k == "inductor"})


if __name__ == "__main__":
    main()
