"""Where the time goes in a training step: CUDA-kernel breakdown of a classifier's train step
(bf16 autocast, channels_last), eager and under ``torch.compile``; with ``--task upernet`` the
ADE20K UPerNet training step of ``benchmarks/models.py`` (SemanticSegmentationTask: UPerNet 512
channels + aux FCN, 150 classes, the task's own loss) instead of the classifier.

To run (CUDA machine, repo root):
    python benchmarks/model_profile.py [--models vmamba_tiny] [--size 224] [--batch 64]
        [--task classifier|upernet] [--compile] [--out DIR]

Prints images/s and peak memory for each variant, and the top CUDA kernels of the eager step
grouped into: scan (our Triton kernels), matmul, norm, elementwise, copies/permutes, conv, other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401

import torch  # noqa: E402


def _group(name: str) -> str:
    n = name.lower()
    if "_upce_" in n:
        return "loss"  # upsampled_cross_entropy's kernels
    if "_rconv_" in n or "implicit_gemm" in n:
        return "conv"  # the route conv's kernels; cuDNN's implicit-GEMM convolutions (named like GEMMs)
    if any(k in n for k in ("_fwd_kernel", "_bwd_kernel", "_carry_kernel", "_sum_routes", "scan")):
        return "scan"
    if any(k in n for k in ("gemm", "sm90", "cutlass", "nvjet", "matmul", "wgrad", "dgrad")) and "conv" not in n:
        return "matmul"
    if "conv" in n or "depthwise" in n:
        return "conv"
    if "norm" in n:
        return "norm"
    if any(k in n for k in ("copy", "transpose", "permute", "cat", "contiguous")):
        return "copy"
    if "triton" in n:
        return "inductor"
    if any(k in n for k in ("elementwise", "vectorized", "reduce", "silu", "gelu", "mul", "add")):
        return "elementwise"
    if "adam" in n or "foreach" in n:
        return "optimizer"
    return "other"


COMPILE_MODE = None  # torch.compile mode (--compile-mode): None, "reduce-overhead" (CUDA graphs), ...


def build(name, dev, compile_model=False, size=224, task="classifier"):
    """(module, callable images -> loss-ready output, optimizer) for a classifier or a UPerNet task."""
    import timm

    import mamba_dense.encoders  # noqa: F401

    if task == "upernet":
        import models as bm  # benchmarks/models.py: the same segmenter and channels_last rules

        spec = next(s for s in bm.SPECS if s.key == name)
        model = bm.apply_channels_last(bm.build_segmenter(spec, size).to(dev), bm.channels_last_mode(spec, "auto"))
        model.train()
    else:
        model = timm.create_model(name, num_classes=1000).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = model if task != "upernet" else model.training_loss  # (images, masks) -> (loss, ...)
    if compile_model:
        # one eager step first: routes are then cached device tensors that the compiled graph takes as
        # inputs (see kernels.routes.device_route); without it every call copies its routes and syncs
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            im = torch.randn(2, 3, size, size, device=dev).to(memory_format=torch.channels_last)
            fwd(im) if task != "upernet" else fwd(im, torch.zeros(2, size, size, dtype=torch.long, device=dev))
        fwd = torch.compile(fwd, dynamic=False, mode=COMPILE_MODE)
    return model, fwd, opt


def kernel_profile(step, steps: int = 5, top: int = 40) -> dict:
    """CUDA kernel time per step of ``step()`` (torch.profiler over ``steps`` calls): total, by group
    (:func:`_group`), the ``top`` kernels, and the launches per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    cnt = defaultdict(int)
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t > 0:
            per[ev.key] += t / steps / 1e3  # ms per step
            cnt[ev.key] += ev.count // steps
    groups = defaultdict(float)
    for k, v in per.items():
        groups[_group(k)] += v
    return dict(kernel_ms=sum(per.values()), groups_ms=dict(sorted(groups.items(), key=lambda kv: -kv[1])),
                top=[dict(kernel=k[:110], ms=v, calls=cnt[k]) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]],
                kernels_per_step=sum(cnt.values()))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution_backward",
              "aten::cudnn_convolution", "aten::_convolution")


def op_shapes_profile(step, steps: int = 3, ops: tuple[str, ...] = MATMUL_OPS, top: int = 20) -> list[dict]:
    """Device time per step of the ``ops`` (aten operators, matrix products and convolutions by
    default) grouped by their input shapes: which GEMM / convolution shapes the kernel time of
    :func:`kernel_profile`'s "matmul" and "conv" groups comes from. CPU time where there is no GPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key not in ops:
            continue
        t = (getattr(ev, "device_time_total", 0) or 0) if cuda else ev.cpu_time_total
        rows.append(dict(op=ev.key, shapes=str(ev.input_shapes)[:160], ms=t / steps / 1e3, calls=ev.count // steps))
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def host_syncs(step) -> dict:
    """Device-to-host synchronisations in one step, by Python source line (``torch.cuda``'s sync debug
    mode warns once per synchronising call). A step that is slower than its kernels (host-bound)
    with syncs in it waits for the GPU at each of them."""
    import warnings
    from collections import Counter

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return dict(syncs_per_step=sum(where.values()), sync_sites=where.most_common(8))


def host_profile(step, steps=3, top=30) -> list:
    """Where the host's time goes in a step (cProfile, Python functions by own time): for a step that
    takes longer than its kernels, this names the Python work that the GPU waits for."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr)
    rows = []
    for (fn, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append(dict(fn=f"{Path(fn).name}:{line}:{func}", calls=nc // steps, own_ms=1e3 * tt / steps,
                         cum_ms=1e3 * ct / steps))
    return sorted(rows, key=lambda r: -r["own_ms"])[:top]


def bench(name, size, batch, dev, compile_model=False, steps=20, profile=False, task="classifier"):
    model, fwd, opt = build(name, dev, compile_model, size, task)
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    if task == "upernet":
        y = torch.randint(0, 150, (batch, size, size), device=dev)
        y[torch.rand(y.shape, device=dev) < 0.1] = 255  # some ignored pixels, as in ADE20K

        def loss_fn(images, y):
            return fwd(images, y)[0]
    else:
        y = torch.randint(0, 1000, (batch,), device=dev)

        def loss_fn(images, y):
            return torch.nn.functional.cross_entropy(fwd(images), y)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_c = time.perf_counter()
    for _ in range(3 if not compile_model else 5):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t_c
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[1]
    res = dict(model=name, task=task, size=size, batch=batch, compiled=compile_model,
               compile_mode=COMPILE_MODE if compile_model else None, images_per_s=batch * steps / dt,
               step_ms=1e3 * dt / steps, peak_GiB=torch.cuda.max_memory_allocated() / 2**30, warmup_s=warm)
    if profile:
        res.update(kernel_profile(step))
        res.update(host_syncs(step))
        res["host_top"] = host_profile(step)
    del model, fwd, opt
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vmamba_tiny")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--task", choices=("classifier", "upernet"), default="classifier")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed repeat (3 repeats)")
    ap.add_argument("--compile", action="store_true", help="also run the model under torch.compile")
    ap.add_argument("--compiled-only", action="store_true", help="only the torch.compile variant")
    ap.add_argument("--compile-mode", default=None,
                    help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs: no per-kernel launch cost)')
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    global COMPILE_MODE
    COMPILE_MODE = args.compile_mode
    dev = torch.device("cuda")
    import triton

    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), cmd=" ".join(sys.argv))
    print(info, flush=True)
    rows = []
    for name in args.models.split(","):
        for comp in ((True,) if args.compiled_only else (False, True) if args.compile else (False,)):
            try:
                r = bench(name, args.size, args.batch, dev, compile_model=comp, steps=args.steps, profile=True,
                          task=args.task)
            except Exception as e:  # report and go on
                r = dict(model=name, compiled=comp, error=f"{type(e).__name__}: {str(e)[:800]}")
                print(r, flush=True)
                rows.append(r)
                continue
            rows.append(r)
            print(f"\n{name} compiled={comp}: {r['images_per_s']:.0f} img/s, {r['step_ms']:.1f} ms/step, "
                  f"peak {r['peak_GiB']:.2f} GiB (warmup {r['warmup_s']:.0f} s)", flush=True)
            print("  groups (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in r["groups_ms"].items()))
            print(f"  host syncs per step: {r['syncs_per_step']} {r['sync_sites']}; kernels per step: "
                  f"{r['kernels_per_step']}")
            print("  host (cProfile, own ms/step): " + "; ".join(
                f"{h['fn']} x{h['calls']} {h['own_ms']:.1f}" for h in r["host_top"][:12]))
            for t in r["top"][:18]:
                print(f"  {t['ms']:7.3f} ms  x{t['calls']:3d}  {t['kernel']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "model_profile.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
