"""Backbones side by side on the GPU (issue 7): ours against ConvNeXt-T, Swin-T and DeiT-S.

To run (CUDA machine, repo root; the UPerNet cases build ``SemanticSegmentationTask``, which needs
segmentation_models_pytorch and nibabel: the wheels in .bench_deps):
    python3 -m pip install -q --no-deps .bench_deps/*.whl
    python3 benchmarks/models.py --quick --out $OUT          # everything, about 6-7 min on an H100
    python3 benchmarks/models.py --only vmamba_tiny,convnext_tiny,train224 --compile --out $OUT
    python3 benchmarks/plot_models.py $OUT/models.json      # -> models_resolution.png (matplotlib)

CPU smoke mode (every model and case at 64 px, batch 1, one iteration):
    OMP_NUM_THREADS=1 python3 benchmarks/models.py --device cpu --smoke --out /tmp/models_smoke

Models (one process, one after the other, each built fresh per case):
- ours, as the ADE20K configs build them (``configs/ade20k/upernet_<name>_512x512_160k.yaml``:
  encoder kwargs, drop path): ``vmamba_tiny``, ``localvmamba_tiny``, ``himamba_tiny``,
  ``mambar_small`` (Vim with registers; its dense mode has the simple pyramid to strides 4-32);
- timm: ``convnext_tiny``, ``swin_tiny_patch4_window7_224`` (``img_size`` = the case's resolution;
  timm pads the feature maps to whole 7x7 windows, so every size runs; ``feature_cls="getter"`` for
  NCHW maps) and ``deit_small_patch16_224`` (``img_size`` set; fused attention = SDPA, as timm
  defaults; blocks 2, 5, 8, 11 through the same simple pyramid as ``mambar_small``, the ViTDet/BEiT
  neck, so it feeds the same UPerNet). Drop path as in their mmseg UPerNet recipes (0.4, 0.3, 0.1).

Cases (``--only`` selects by model and/or case name; globs allowed):
- ``infer224`` (batch 128), ``infer2048`` (batch 1): backbone forward under ``torch.no_grad``;
- ``train224`` (b64), ``train512`` (b16), ``train1024`` (b2): backbone forward + backward of the
  sum of the means of all four feature maps + AdamW step;
- ``upernet512`` (b16), ``upernet1024`` (b4): ``SemanticSegmentationTask`` (UPerNet 512 channels,
  150 classes, auxiliary FCN, the configs' settings) forward + cross-entropy (+0.4 aux) + backward +
  AdamW step;
- ``sweep``: backbone inference at batch 1 over 224, 512, 1024, 2048, 3072, 4096 px (``infer2048``
  is the sweep's 2048 point), for the time/memory-vs-resolution plot and the crossover with DeiT-S.

Everything runs under bf16 autocast with fp32 weights. channels_last (``--channels-last auto``):
model and input for ours and ConvNeXt (conv stems whose outputs are permuted to tokens), the UPerNet
head only for Swin/DeiT; ``on``/``off`` force it for all. ``--compile`` wraps the backbone (and the
segmentation forward + loss) in ``torch.compile`` (our scan is a registered custom op).

Timing: ``warmup`` untimed iterations, then one timed iteration sets the iterations per repeat
(about ``min_time`` seconds each, at most ``max_iters``), then ``repeats`` repeats timed with CUDA
events; the result is the median time per iteration, images/s = batch / that. Peak memory is
``torch.cuda.max_memory_allocated`` from a reset after the warm-up (weights, gradients and optimizer
state included). Out of memory is recorded as "OOM" and the run goes on. ``models.json`` (in
``--out``, default $OUT or .) is rewritten after every measurement, so a run cut short keeps what it
measured; ``--budget-s`` stops starting new measurements after that many seconds (default 510 with
``--quick``).
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401  (mamba_dense importable without an install)

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import mamba_dense.encoders  # noqa: E402,F401  (registers our encoders in timm)
from mamba_dense.layers.pyramid import SimplePyramid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 150
SWEEP = (224, 512, 1024, 2048, 3072, 4096)


@dataclass(frozen=True)
class Spec:
    """One backbone: its timm name, how to build it, and where it comes from."""

    key: str
    timm_name: str
    ours: bool
    config: str | None = None  # ADE20K recipe (ours): encoder kwargs and drop path come from it
    drop_path: float = 0.0  # peers: their mmseg UPerNet recipe
    kwargs: dict = field(default_factory=dict)
    img_size: bool = False  # pass img_size=<resolution> (position embeddings / window masks)
    vit_blocks: tuple[int, ...] | None = None  # plain ViT: tapped blocks, then the simple pyramid
    conv_stem: bool = True  # channels_last helps model and input (auto mode)


SPECS = [
    Spec("vmamba_tiny", "vmamba_tiny", True, "configs/ade20k/upernet_vmamba_tiny_512x512_160k.yaml"),
    Spec("localvmamba_tiny", "localvmamba_tiny", True, "configs/ade20k/upernet_localvmamba_tiny_512x512_160k.yaml"),
    Spec("himamba_tiny", "himamba_tiny", True, "configs/ade20k/upernet_himamba_tiny_512x512_160k.yaml"),
    Spec("mambar_small", "mambar_small", True, "configs/ade20k/upernet_mambar_small_512x512_160k.yaml"),
    Spec("convnext_tiny", "convnext_tiny", False, drop_path=0.4),
    Spec("swin_tiny", "swin_tiny_patch4_window7_224", False, drop_path=0.3, kwargs={"feature_cls": "getter"},
         img_size=True, conv_stem=False),
    Spec("deit_small", "deit_small_patch16_224", False, drop_path=0.1, img_size=True, vit_blocks=(2, 5, 8, 11),
         conv_stem=False),
]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "infer" | "train" | "upernet"
    size: int
    batch: int


def make_cases(smoke: bool, sweep: tuple[int, ...]) -> list[Case]:
    if smoke:
        s = 64
        cases = [Case("infer224", "infer", s, 1), Case("train224", "train", s, 1), Case("upernet512", "upernet", s, 1)]
        return cases + [Case("sweep", "infer", r, 1) for r in sweep]
    # NOTE: the order is the order of importance: a run cut short by --budget-s loses the last ones.
    return [
        Case("infer224", "infer", 224, 128),
        Case("train224", "train", 224, 64),
        Case("train512", "train", 512, 16),
        Case("upernet512", "upernet", 512, 16),
        *[Case("sweep", "infer", r, 1) for r in sweep],
        Case("infer2048", "infer", 2048, 1),
        Case("train1024", "train", 1024, 2),
        Case("upernet1024", "upernet", 1024, 4),
    ]


# ---------------------------------------------------------------------------------------- models


class PyramidViT(nn.Module):
    """A plain ViT's features_only model + the simple feature pyramid (strides 4, 8, 16, 32), as
    ``mambar_small``'s dense mode does it: four stride-16 block outputs -> deconvs / identity / pool."""

    def __init__(self, body: nn.Module, dim: int, patch: int = 16) -> None:
        super().__init__()
        self.body = body
        self.pyramid = SimplePyramid(dim, in_stride=patch)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.pyramid(self.body(x), image_size=tuple(x.shape[-2:]))


def _read_config(spec: Spec) -> dict[str, Any]:
    import yaml

    path = ROOT / (spec.config or "configs/ade20k/upernet_vmamba_tiny_512x512_160k.yaml")
    return dict(yaml.safe_load(path.read_text())["model"]["init_args"])


def encoder_kwargs(spec: Spec, size: int) -> dict[str, Any]:
    """timm.create_model kwargs of the backbone (besides features_only) at resolution ``size``."""
    if spec.ours:
        cfg = _read_config(spec)
        kw = dict(cfg.get("encoder_kwargs") or {})
        if cfg.get("drop_path_rate") is not None:
            kw["drop_path_rate"] = cfg["drop_path_rate"]
        return kw
    kw = dict(spec.kwargs, drop_path_rate=spec.drop_path)
    if spec.img_size:
        kw["img_size"] = size
    if spec.vit_blocks:
        kw["out_indices"] = spec.vit_blocks
    return kw


def build_backbone(spec: Spec, size: int) -> nn.Module:
    """The features-only backbone: (B, 3, H, W) -> 4 maps (B, C_i, H / s_i, W / s_i), s = 4, 8, 16, 32."""
    model = timm.create_model(spec.timm_name, features_only=True, pretrained=False, **encoder_kwargs(spec, size))
    if spec.vit_blocks:
        model = PyramidViT(model, model.feature_info.channels()[-1], patch=model.feature_info.reduction()[-1])
    return model


def build_segmenter(spec: Spec, size: int) -> nn.Module:
    """``SemanticSegmentationTask`` with UPerNet (512 ch) + aux FCN for 150 classes, as configs/ade20k builds it."""
    from mamba_dense.tasks.semantic import SemanticSegmentationTask

    cfg = _read_config(spec)
    for k in ("encoder_weights", "class_names", "predict_dir"):
        cfg.pop(k, None)
    cfg["num_classes"] = NUM_CLASSES
    if not spec.ours:
        cfg.update(encoder=spec.timm_name, drop_path_rate=spec.drop_path)
        kw = dict(spec.kwargs)
        if spec.img_size:
            kw["img_size"] = size
        cfg["encoder_kwargs"] = kw
        if spec.vit_blocks:
            cfg["encoder_out_indices"] = list(spec.vit_blocks)
    task = SemanticSegmentationTask(**cfg)
    if spec.vit_blocks:  # NOTE: the head was built for 4 maps of embed_dim channels; the pyramid keeps them
        body = task.encoder.model
        task.encoder.model = PyramidViT(body, body.feature_info.channels()[-1], patch=body.feature_info.reduction()[-1])
    return task


def n_params(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# ---------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    warmup: int
    repeats: int
    min_time: float  # seconds per repeat
    max_iters: int
    fixed_iters: int | None = None  # smoke: exactly this many


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, t: Timing) -> dict[str, Any]:
    """Median seconds per call of ``fn`` over ``t.repeats`` repeats, and the peak memory after warm-up
    (``peak_gib``) and over warm-up and timing together (``peak_gib_all``: under CUDA graphs the
    step's memory is the graph pool, allocated during warm-up, which ``peak_gib`` does not see)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(t.warmup):
        fn()
    sync(device)
    peak_warm = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if t.fixed_iters:
        iters = t.fixed_iters
    else:
        start = time.perf_counter()
        fn()
        sync(device)
        probe = time.perf_counter() - start
        iters = max(1, min(t.max_iters, math.ceil(t.min_time / max(probe, 1e-6))))
    per_iter = []
    for _ in range(t.repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            per_iter.append(begin.elapsed_time(end) / 1e3 / iters)
        else:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            per_iter.append((time.perf_counter() - start) / iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": statistics.median(per_iter), "seconds_repeats": per_iter, "iters": iters, "peak_gib": peak,
            "peak_gib_all": max(peak, peak_warm) if peak is not None else None}


def channels_last_mode(spec: Spec, mode: str) -> str:
    """"all" (model + input), "head" (UPerNet head only) or "none"."""
    if mode == "on":
        return "all"
    if mode == "off":
        return "none"
    return "all" if spec.conv_stem else "head"


def apply_channels_last(model: nn.Module, cl: str) -> nn.Module:
    """Put ``model`` (a backbone or a segmenter) in the memory format of ``channels_last_mode``'s answer."""
    if cl == "all":
        return model.to(memory_format=torch.channels_last)
    if cl == "head":
        for head in (getattr(model, "decode_head", None), getattr(model, "aux_head", None)):
            if head is not None:
                head.to(memory_format=torch.channels_last)
    return model


def run_case(spec: Spec, case: Case, args: argparse.Namespace, device: torch.device, timing: Timing) -> dict[str, Any]:
    """Build the model for ``case``, time it; returns the measurement (raises on OOM)."""
    cl = channels_last_mode(spec, args.channels_last)
    fmt = torch.channels_last if cl == "all" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 3, case.size, case.size, generator=gen).to(device).contiguous(memory_format=fmt)
    torch.manual_seed(0)

    if case.kind == "upernet":
        model = build_segmenter(spec, case.size)
        mask = torch.randint(0, NUM_CLASSES, (case.batch, case.size, case.size), generator=gen)
        mask[torch.rand(mask.shape, generator=gen) < 0.1] = 255  # some ignored pixels, as in ADE20K
        mask = mask.to(device)
    else:
        model = build_backbone(spec, case.size)
    params = n_params(model)
    model = apply_channels_last(model.to(device), cl)

    if args.compile:
        # one eager forward first: the routes become cached device tensors that the compiled graph
        # takes as inputs (kernels.routes.device_route); otherwise every call copies them and syncs
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            (model._logits(x[:1], with_aux=False) if case.kind == "upernet" else model(x[:1]))
    if case.kind == "infer":
        model.eval()
        fwd = torch.compile(model, dynamic=False, mode=args.compile_mode) if args.compile else model

        # NOTE: no_grad (inference_mode would do as well since routes are no longer cached as
        # inference tensors; the first run of this script found that bug: a route first built under
        # inference_mode broke a later backward at that shape).
        def step() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                fwd(x)
    else:
        model.train()
        if case.kind == "upernet":
            def loss_of(images: torch.Tensor) -> torch.Tensor:
                return model.training_loss(images, mask)[0]  # main + aux_weight * aux, as training_step
        else:
            def loss_of(images: torch.Tensor) -> torch.Tensor:
                return sum(f.float().mean() for f in model(images))

        fwd_loss = torch.compile(loss_of, dynamic=False, mode=args.compile_mode) if args.compile else loss_of
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = fwd_loss(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    if args.compile:
        from torch._dynamo.utils import counters

        counters.clear()
    out = time_fn(step, device, timing)
    if args.compile:
        breaks = counters["graph_break"]
        out.update(graph_breaks=sum(breaks.values()), graph_break_reasons=[str(r)[:200] for r in list(breaks)[:5]],
                   graphs=counters["stats"].get("unique_graphs", 0))
    out.update(params_m=params, channels_last=cl, images_per_s=case.batch / out["seconds"], ms=1e3 * out["seconds"])
    return out


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "cuda_error_out_of_memory" in text


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- selection


def select(tokens: list[str], specs: list[Spec], cases: list[Case]) -> tuple[list[Spec], list[Case]]:
    """``--only`` tokens: each names models (key or timm name) or cases (case name); globs allowed.
    Models are filtered only if some token names a model, cases only if some token names a case."""
    def hit(tok: str, *names: str) -> bool:
        return any(fnmatch.fnmatch(n, tok) for n in names)

    model_toks = [t for t in tokens if any(hit(t, s.key, s.timm_name) for s in specs)]
    case_toks = [t for t in tokens if any(hit(t, c.name) for c in cases)]
    unknown = [t for t in tokens if t not in model_toks and t not in case_toks]
    if unknown:
        raise SystemExit(f"--only: {unknown} name no model ({[s.key for s in specs]}) and no case "
                         f"({sorted({c.name for c in cases})})")
    if model_toks:
        specs = [s for s in specs if any(hit(t, s.key, s.timm_name) for t in model_toks)]
    if case_toks:
        cases = [c for c in cases if any(hit(t, c.name) for t in case_toks)]
    return specs, cases


# ---------------------------------------------------------------------------------------- report


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "timm_fused_attn": bool(timm.layers.use_fused_attn()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python3", *sys.argv]),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    info["source_sha1"] = source_hash()
    return info


def source_hash() -> str:
    """SHA-1 over the package's Python sources (kernels/, mamba_dense/): names the code that ran
    even where the checkout's git metadata is stale or absent (e.g. a copied working tree)."""
    import hashlib

    h = hashlib.sha1()
    for folder in ("kernels", "mamba_dense"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def crossover(rows: list[dict], ours: str, peer: str) -> dict[str, Any]:
    """First sweep resolution from which ``ours`` is faster than ``peer`` at every larger one
    (the peer out of memory counts as slower; ours out of memory as not faster)."""
    def times(model: str) -> dict[int, float | None]:
        return {r["size"]: (r["seconds"] if r["status"] == "ok" else None)
                for r in rows if r["model"] == model and r["case"] == "sweep" and r["status"] in ("ok", "OOM")}

    a, b = times(ours), times(peer)
    sizes = sorted(set(a) & set(b))
    faster = [a[s] is not None and (b[s] is None or a[s] < b[s]) for s in sizes]
    first = None
    for i in range(len(sizes)):
        if all(faster[i:]):
            first = sizes[i]
            break
    ratio = {s: (b[s] / a[s] if a[s] and b[s] else None) for s in sizes}  # > 1: ours faster
    return {"ours": ours, "peer": peer, "sizes": sizes, "first_faster_from": first, "speedup": ratio}


def cell(row: dict | None, what: str) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"] if row["status"] in ("OOM", "skipped") else "error"
    if what == "ips":
        mem = f" {row['peak_gib']:.1f}G" if row.get("peak_gib") is not None else ""
        return f"{row['images_per_s']:.0f}{mem}" if row["images_per_s"] >= 10 else f"{row['images_per_s']:.2f}{mem}"
    mem = f" {row['peak_gib']:.1f}G" if row.get("peak_gib") is not None else ""
    return f"{row['ms']:.1f}ms{mem}"


def print_summary(result: dict) -> None:
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    env = result["env"]
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, timm {env['timm']}, {env['date']}")
    settings = result["settings"]
    print(f"bf16 autocast; compile={settings['compile']}, channels_last={settings['channels_last']}")
    fixed = [c for c in ("infer224", "infer2048", "train224", "train512", "train1024", "upernet512", "upernet1024")
             if any(r["case"] == c for r in rows)]
    if fixed:
        by = {(r["model"], r["case"]): r for r in rows if r["case"] != "sweep"}
        batches = {r["case"]: r["batch"] for r in rows}
        print("\nimages/s and peak GiB")
        heads = [f"{c} b{batches[c]}" for c in fixed]
        print(f"{'model':<18}" + "".join(f"{h:>17}" for h in heads))
        for m in models:
            print(f"{m:<18}" + "".join(f"{cell(by.get((m, c)), 'ips'):>17}" for c in fixed))
    sweep = [r for r in rows if r["case"] == "sweep"]
    if sweep:
        sizes = sorted({r["size"] for r in sweep})
        by = {(r["model"], r["size"]): r for r in sweep}
        print("\nbackbone inference, batch 1: ms per image and peak GiB")
        print(f"{'model':<18}" + "".join(f"{s:>16}" for s in sizes))
        for m in models:
            print(f"{m:<18}" + "".join(f"{cell(by.get((m, s)), 'ms'):>16}" for s in sizes))
    for c in result["summary"].get("crossover", []):
        sp = ", ".join(f"{s}: {v:.2f}x" for s, v in c["speedup"].items() if v is not None)
        where = (f"from {c['first_faster_from']} px on" if c["first_faster_from"] is not None
                 else "at no resolution of the sweep")
        print(f"crossover: {c['ours']} is faster than {c['peer']} (batch-1 inference) {where} "
              f"(speedup {c['peer']} time / {c['ours']} time: {sp or 'n/a'})")
    errors = [r for r in rows if r["status"] == "error"]
    for r in errors:
        print(f"error: {r['model']} {r['case']} {r['size']}px b{r['batch']}: {r['error']}")


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", default="", help="comma-separated model / case names or globs, e.g. vmamba_tiny,sweep")
    p.add_argument("--quick", action="store_true", help="fewer iterations (all cases in ~8 min on an H100)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one iteration (CPU check)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone / forward + loss")
    p.add_argument("--compile-mode", default=None,
                   help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs); implies --compile')
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--sweep", type=int, nargs="+", default=None, help=f"sweep resolutions (default {list(SWEEP)})")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--min-time", type=float, default=None, help="seconds per timed repeat")
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new measurement after this many seconds (default 510 with --quick)")
    p.add_argument("--list", action="store_true", help="print the models and cases, then exit")
    p.add_argument("--out", default=None, help="folder for models.json (default $OUT or .)")
    args = p.parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None

    device = torch.device(args.device)
    if args.smoke:
        timing = Timing(warmup=0, repeats=1, min_time=0.0, max_iters=1, fixed_iters=1)
    elif args.quick:
        timing = Timing(warmup=2, repeats=3, min_time=0.25, max_iters=20)
    else:
        timing = Timing(warmup=5, repeats=5, min_time=1.0, max_iters=100)
    for name in ("warmup", "repeats", "min_time", "max_iters"):
        if getattr(args, name) is not None:
            setattr(timing, name, getattr(args, name))
    budget = args.budget_s if args.budget_s is not None else (510.0 if args.quick else None)
    sweep = tuple(args.sweep) if args.sweep else ((32, 64) if args.smoke else SWEEP)
    tokens = [t for t in args.only.replace(" ", ",").split(",") if t]
    specs, cases = select(tokens, SPECS, make_cases(args.smoke, sweep))
    if args.list:
        print("models:", ", ".join(f"{s.key} ({s.timm_name})" for s in specs))
        print("cases:", ", ".join(f"{c.name}:{c.kind}@{c.size}b{c.batch}" for c in cases))
        return {}
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or use --device cpu --smoke")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    out_dir = Path(args.out or os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "env": environment(device),
        "settings": {"compile": args.compile, "compile_mode": args.compile_mode, "channels_last": args.channels_last, "quick": args.quick,
                     "smoke": args.smoke, "timing": vars(timing), "budget_s": budget, "sweep": list(sweep),
                     "models": {s.key: s.timm_name for s in specs}, "ours": [s.key for s in specs if s.ours]},
        "rows": [],
        "summary": {},
    }

    def save() -> None:
        peers = {s.key for s in specs if not s.ours}
        if "deit_small" in peers:
            result["summary"]["crossover"] = [crossover(result["rows"], s.key, "deit_small") for s in specs if s.ours]
        (out_dir / "models.json").write_text(json.dumps(result, indent=1))

    print(result["env"], flush=True)
    start = time.perf_counter()
    done: dict[tuple, dict] = {}  # (model, kind, size, batch) -> row; infer2048 is the sweep's 2048 point
    jobs = [(c, s) for c in cases for s in specs]
    for i, (case, spec) in enumerate(jobs, 1):
        row: dict[str, Any] = {"model": spec.key, "timm_name": spec.timm_name, "ours": spec.ours, "case": case.name,
                               "kind": case.kind, "size": case.size, "batch": case.batch, "compile": args.compile}
        key = (spec.key, case.kind, case.size, case.batch)
        elapsed = time.perf_counter() - start
        if key in done:
            first = done[key]
            row.update({k: v for k, v in first.items() if k not in row}, note=f"same measurement as {first['case']}")
        elif budget is not None and elapsed > budget:
            row.update(status="skipped", error=f"time budget of {budget:.0f} s spent")
        else:
            t0 = time.perf_counter()
            try:
                row.update(run_case(spec, case, args, device, timing), status="ok")
            except Exception as err:  # noqa: BLE001  (record and go on)
                if is_oom(err):
                    row.update(status="OOM")
                else:
                    row.update(status="error", error=f"{type(err).__name__}: {str(err)[:400]}")
            row["wall_s"] = round(time.perf_counter() - t0, 2)
            free(device)
            if args.compile:
                torch._dynamo.reset()
            done[key] = row
        result["rows"].append(row)
        save()
        what = (f"{row['images_per_s']:.1f} images/s, {row['ms']:.2f} ms"
                + (f", peak {row['peak_gib']:.2f} GiB" if row.get("peak_gib") is not None else "")
                + (f" ({row['peak_gib_all']:.2f} GiB incl. warm-up)" if row.get("peak_gib_all") is not None else "")
                + (f", {row['graphs']} graph(s), {row['graph_breaks']} graph break(s)" if "graphs" in row else "")
                if row["status"] == "ok" else row["status"] + (f" ({row['error']})" if row.get("error") else ""))
        print(f"[{i}/{len(jobs)} {time.perf_counter() - start:6.0f}s] {spec.key:<17} {case.name:<11} "
              f"{case.size}px b{case.batch}: {what}", flush=True)

    result["env"]["total_s"] = round(time.perf_counter() - start, 1)
    save()
    print_summary(result)
    print(f"\nwrote {out_dir / 'models.json'} ({result['env']['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
