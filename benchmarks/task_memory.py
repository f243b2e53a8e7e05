"""Peak memory of one UPerNet training step (forward + loss + backward, bf16 autocast), broken
into parameters / activations / temporaries by `torch.distributed._tools.mem_tracker.MemTracker`.
Runs on the CPU (CPU autocast) or a GPU; on the CPU it answers "what does the step keep alive",
not the CUDA allocator's exact peak.

To run (repo root):
    python benchmarks/task_memory.py --encoder convnext_tiny --batch 4 [--size 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401

import torch  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="vmamba_tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from mamba_dense.tasks import SemanticSegmentationTask

    dev = torch.device(args.device)
    task = SemanticSegmentationTask(num_classes=args.classes, encoder=args.encoder, head="upernet",
                                    head_kwargs=dict(channels=512), aux_head=True).to(dev).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    mask = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=dev)
    mt = MemTracker()
    mt.track_external(task)
    t0 = time.perf_counter()
    with mt:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = task.training_loss(x, mask)[0]
        loss.backward()
    print(f"{args.encoder} UPerNet, {args.size}px, batch {args.batch}, {dev}, bf16 autocast "
          f"({time.perf_counter() - t0:.1f} s); peak by category:")
    mt.display_snapshot("peak", units="MiB", tabulate=False)


if __name__ == "__main__":
    main()
