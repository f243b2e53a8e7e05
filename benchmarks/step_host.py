"""Is a 3D model's training step GPU-bound or host-bound? (CUDA only)

To run (repo root, on a GPU machine):
    python benchmarks/step_host.py [--model segmamba_tiny] [--steps 6]

Prints, per step: the time the host takes to enqueue the step (no sync; the host also waits here
when the launch queue is full), the time until the GPU is done, and the garbage collections that
ran inside the step (count, generation 2 count, total ms; ``--gc freeze`` moves every object alive
after the warm-up out of the collector's reach, ``--gc off`` disables automatic collection); then
the synchronizing calls inside one step (``torch.cuda.set_sync_debug_mode("warn")``, with their
Python stacks) and a cProfile of one step by self time. Same step as benchmarks/volumes.py
(128^3, batch 2, 4 channels, 4 classes, bf16 autocast, SGD, cuDNN benchmark mode).
"""

import argparse
import collections
import cProfile
import gc
import io
import pstats
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401

import torch  # noqa: E402

import volumes as V  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="segmamba_tiny", choices=V.OURS)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gc", choices=("on", "freeze", "off"), default="on",
                    help="Python garbage collector during the timed steps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    shape = argparse.Namespace(batch=2, in_chans=4, size=128, classes=4, dtype="bf16")
    step = V.make_train_step(V.build_ours(args.model, shape.in_chans, shape.classes, shape.size), shape, dev)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.gc == "freeze":
        gc.collect()
        gc.freeze()
    elif args.gc == "off":
        gc.disable()
    collections_seen: list = []  # (generation, seconds) of each collection
    started: list = []

    def on_gc(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            collections_seen.append((info["generation"], time.perf_counter() - started.pop()))

    gc.callbacks.append(on_gc)
    for i in range(args.steps):
        collections_seen.clear()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        n2 = sum(g == 2 for g, _ in collections_seen)
        gc_ms = 1e3 * sum(t for _, t in collections_seen)
        print(f"step {i}: host enqueue {1e3 * (t1 - t0):.1f} ms, until GPU done {1e3 * (t2 - t0):.1f} ms, "
              f"gc {len(collections_seen)} collections ({n2} of generation 2) {gc_ms:.1f} ms", flush=True)
    gc.callbacks.remove(on_gc)

    seen: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        seen["".join(traceback.format_stack(limit=12)[:-2])] += 1

    shown = warnings.showwarning
    warnings.showwarning = record
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)
    warnings.showwarning = shown
    print(f"{sum(seen.values())} synchronizing calls in one step (the set_sync_debug_mode call itself may "
          f"count once), {len(seen)} distinct stacks")
    for st, n in seen.most_common(8):
        print(f"--- x{n}\n{st}")

    pr = cProfile.Profile()
    pr.enable()
    step()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
