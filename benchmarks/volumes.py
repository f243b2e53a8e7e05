"""3D segmentation models side by side: one training step, and sliding-window inference of a CT.

To run (on a CUDA machine, from the repo root; MONAI is a benchmark-only dependency):
    pip install monai            # optional: adds SwinUNETR (feature size 48) and a residual DynUNet
    python benchmarks/volumes.py [--out results_dir]

CPU smoke mode (what the tests run):
    python benchmarks/volumes.py --device cpu --size 32 --steps 1 --warmup 0 --sw-shape 40 36 44

Training step (``--size``^3 patches, ``--batch`` volumes, ``--in-chans`` channels, ``--classes``
outputs; defaults 128, 2, 4, 4): forward + Dice/cross-entropy loss + backward + SGD step under
bf16 autocast (fp32 weights), timed over ``--steps`` steps after ``--warmup`` steps; volumes/s from
the median step time, peak memory from ``torch.cuda.max_memory_allocated`` (GiB) after resetting
it per model. Models: ours (``segmamba_tiny`` and ``vmamba3d_tiny`` encoders + the UNet3D decoder,
as ``VolumetricSegmentationTask`` builds them) and, with MONAI, ``SwinUNETR(feature_size=48)`` and
an nnU-Net-like residual ``DynUNet`` (6 levels, filters 32..320, instance norm, residual blocks).

Sliding window (``--sw-shape``, default 300 x 512 x 512 voxels = a 512 x 512 x 300 CT, 1 channel,
2 classes): ``segmamba_tiny`` at ``--size``^3 windows, overlap 0.5, Gaussian blending, ``--sw-batch``
windows per forward, bf16 autocast, logits accumulated in fp32 (on the GPU when they fit), argmax
included; the time of the second of two runs.

Prints a table and writes ``volumes.json`` to ``--out`` (default: $OUT, else the current folder).
Targets (H100): segmamba_tiny at least as fast as the residual DynUNet and >= 2.5x SwinUNETR's
volumes/s with less memory than SwinUNETR; the sliding-window CT in under 10 s.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401  (mamba_dense importable without an install)

OURS = ("segmamba_tiny", "vmamba3d_tiny")
PEERS = ("swinunetr", "dynunet_res")


ENCODER_KWARGS: dict = {}  # --encoder-kwargs (smoke tests use narrow encoders; the benchmark uses none)


def build_ours(name: str, in_chans: int, classes: int, size: int, channels_last: bool = False) -> torch.nn.Module:
    from mamba_dense.tasks.volumetric import VolumetricSegmentationTask

    return VolumetricSegmentationTask(classes, encoder=name, in_channels=in_chans, patch_size=(size,) * 3,
                                      encoder_kwargs=dict(ENCODER_KWARGS) or None, channels_last=channels_last)


def build_peer(name: str, in_chans: int, classes: int, size: int) -> torch.nn.Module:
    from monai.networks.nets import DynUNet, SwinUNETR

    if name == "swinunetr":
        kw = dict(in_channels=in_chans, out_channels=classes, feature_size=48, use_checkpoint=False)
        if "img_size" in inspect.signature(SwinUNETR.__init__).parameters:  # deprecated in newer MONAI
            kw["img_size"] = (size,) * 3
        return SwinUNETR(**kw)
    levels = 6  # nnU-Net 3d_fullres at 128^3: 6 stages, strides 1, 2, 2, 2, 2, 2
    return DynUNet(spatial_dims=3, in_channels=in_chans, out_channels=classes, kernel_size=[3] * levels,
                   strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1),
                   filters=[32, 64, 128, 256, 320, 320], norm_name="instance", res_block=True,
                   deep_supervision=False)


def dice_ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    probs = logits.softmax(1)
    onehot = F.one_hot(label, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    dice = (2 * (probs * onehot).sum(dims) + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
    return F.cross_entropy(logits, label) + 1 - dice[1:].mean()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """One training step of ``model`` on a fixed random batch (SGD, Dice + CE, bf16 autocast unless
    args.dtype is fp32), with the --channels-last / --compile settings applied; returns the step."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, args.in_chans, *(args.size,) * 3, generator=gen).to(device)
    y = torch.randint(0, args.classes, (args.batch, *(args.size,) * 3), generator=gen).to(device)
    if getattr(args, "channels_last", False):
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    fwd = model
    if getattr(args, "compile", False):
        # one eager forward first: our routes become cached device tensors the graph can treat as constants
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            model(x)
        fwd = torch.compile(model, dynamic=False, mode=getattr(args, "compile_mode", None))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = fwd(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = dice_ce(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_train(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    # CUDA graphs (reduce-overhead) allocate their memory pool while they are captured in the warm-up,
    # so the peak is then counted from before the warm-up (an upper bound: it includes the eager
    # first pass and the capture); otherwise from after it
    graphs = getattr(args, "compile", False) and getattr(args, "compile_mode", None) == "reduce-overhead"
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_train_step(model, args, device)
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda" and not graphs:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    prof = None
    if getattr(args, "profile", False) and device.type == "cuda":
        from model_profile import kernel_profile, op_shapes_profile  # kernel time by group / GEMM shape

        prof = kernel_profile(step, steps=3, top=25)
        prof["matmul_conv_shapes"] = op_shapes_profile(step, steps=2)
    return {**({"profile": prof} if prof else {}), "step_s": med, "volumes_per_s": args.batch / med, "peak_gib": mem,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def bench_sliding_window(args: argparse.Namespace, device: torch.device) -> dict:
    from mamba_dense.tasks.sliding_window3d import sliding_window_inference_3d, window_starts

    model = build_ours("segmamba_tiny", 1, 2, args.size).to(device).eval()
    patch = (args.size,) * 3
    shape = tuple(args.sw_shape)
    vol = torch.randn(1, 1, *shape, device=device)

    def run() -> float:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            logits = sliding_window_inference_3d(model, vol, patch, overlap=0.5, sw_batch_size=args.sw_batch)
            labels = logits.argmax(1)
        sync(device)
        assert labels.shape[1:] == shape
        return time.perf_counter() - t

    run()  # warm-up (kernel autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = run()
    windows = 1
    for s, p in zip(shape, patch):
        windows *= len(window_starts(max(s, p), p, 0.5))
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"shape": list(shape), "patch": list(patch), "windows": windows, "seconds": seconds, "peak_gib": mem}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=128, help="training patch and sliding window edge")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--in-chans", type=int, default=4)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", nargs="+", default=[*OURS, *PEERS], choices=[*OURS, *PEERS])
    p.add_argument("--sw-shape", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"))
    p.add_argument("--sw-batch", type=int, default=4)
    p.add_argument("--no-sw", action="store_true", help="skip the sliding-window benchmark")
    p.add_argument("--encoder-kwargs", type=json.loads, default={},
                   help='JSON overrides of our encoders for smoke runs, e.g. \'{"dims": [8, 16, 16, 16]}\'')
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model's forward (ours and the peers alike); warm-up steps compile")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs, for host-bound steps)")
    p.add_argument("--channels-last", action="store_true",
                   help="every model and its input in torch.channels_last_3d (NDHWC) memory format; ours "
                        "through VolumetricSegmentationTask(channels_last=True), which also keeps SegMamba's "
                        "maps in NDHWC and returns NCDHW logits")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark for every model (default on: cuDNN times its algorithms "
                        "per shape in the warm-up steps, as nnU-Net trains and as configs/msd/ set "
                        "trainer.benchmark; numbers before 2026-11-23 were taken with it off)")
    p.add_argument("--profile", action="store_true",
                   help="also print each model's CUDA kernel time per step by group and its top kernels")
    p.add_argument("--out", default=None, help="folder for volumes.json (default $OUT or .)")
    args = p.parse_args(argv)
    ENCODER_KWARGS.clear()
    ENCODER_KWARGS.update(args.encoder_kwargs)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or use --device cpu for a smoke run")
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version = None
        skipped = [m for m in args.models if m in PEERS]
        if skipped:
            print(f"MONAI is not installed: skipping {', '.join(skipped)} (benchmark-only dependency; "
                  "`pip install monai` to compare with SwinUNETR and DynUNet)", flush=True)
        args.models = [m for m in args.models if m not in PEERS]

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "monai": monai_version, "command": " ".join(["python", *sys.argv]),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
    rows: dict[str, dict] = {}
    for name in args.models:
        if name in PEERS and args.size < 64:  # their stride-32 bottleneck would be 1 voxel (instance norm refuses)
            rows[name] = {"skipped": "needs --size >= 64"}
            print(f"{name}: skipped, needs --size >= 64", flush=True)
            continue
        torch.manual_seed(0)
        if name in OURS:  # --channels-last as a user sets it: the task's option (NCDHW logits out)
            model = build_ours(name, args.in_chans, args.classes, args.size, channels_last=args.channels_last)
        else:
            model = build_peer(name, args.in_chans, args.classes, args.size)
        try:
            rows[name] = bench_train(model, args, device)
        except torch.OutOfMemoryError:
            rows[name] = {"error": "out of memory"}
        del model
        if args.compile:
            torch._dynamo.reset()  # drop the compiled graphs (and CUDA-graph pools) before the next model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        prof = rows[name].pop("profile", None)
        print(f"{name}: {rows[name]}", flush=True)
        if prof:
            rows[name]["profile"] = prof
            print(f"  kernels {prof['kernel_ms']:.1f} ms/step ({prof['kernels_per_step']} launches): " + ", ".join(
                f"{k} {v:.1f}" for k, v in prof["groups_ms"].items()), flush=True)
            for t in prof["top"][:15]:
                print(f"  {t['ms']:7.2f} ms x{t['calls']:4d} {t['kernel']}", flush=True)
            print("  matrix products and convolutions by input shape (device ms per step, incl. their kernels):")
            for t in prof["matmul_conv_shapes"][:15]:
                print(f"  {t['ms']:7.2f} ms x{t['calls']:3d} {t['op']} {t['shapes']}", flush=True)
    result = {**info, "train": rows}
    if not args.no_sw:
        result["sliding_window"] = bench_sliding_window(args, device)

    shape = (f"{args.size}^3 x {args.batch}, {args.in_chans} ch, {args.classes} classes, {args.dtype}"
             f"{(', compiled ' + (args.compile_mode or 'default')) if args.compile else ''}{', channels_last_3d' if args.channels_last else ''}"
             f"{', cudnn.benchmark' if args.cudnn_benchmark else ''}")
    print(f"\nTraining step ({shape}) on {info['device']}")
    print(f"{'model':<16} {'params M':>9} {'step ms':>9} {'volumes/s':>10} {'peak GiB':>9}")
    for name, r in rows.items():
        if "volumes_per_s" not in r:
            print(f"{name:<16} {r.get('error') or r.get('skipped')}")
            continue
        print(f"{name:<16} {r['params_m']:9.2f} {1e3 * r['step_s']:9.1f} {r['volumes_per_s']:10.2f} "
              f"{r['peak_gib']:9.2f}")
    base = rows.get("segmamba_tiny", {})
    for peer in PEERS:
        if peer in rows and "volumes_per_s" in rows[peer] and "volumes_per_s" in base:
            print(f"segmamba_tiny / {peer}: {base['volumes_per_s'] / rows[peer]['volumes_per_s']:.2f}x volumes/s")
    if "sliding_window" in result:
        sw = result["sliding_window"]
        print(f"\nSliding window: {'x'.join(map(str, sw['shape']))} voxels, {sw['windows']} windows of "
              f"{args.size}^3, overlap 0.5: {sw['seconds']:.2f} s, peak {sw['peak_gib']:.2f} GiB")
    out = Path(args.out or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "volumes.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'volumes.json'}")
    return result


if __name__ == "__main__":
    main()
