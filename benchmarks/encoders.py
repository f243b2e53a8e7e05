"""Encoders on the GPU: bf16 forward+backward of every family at 224 and 512 (finite?), and
vmamba_tiny backbone training throughput / peak memory at 224, batch 64.

To run (CUDA machine, repo root):
    python benchmarks/encoders.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401

import torch  # noqa: E402

FAMILIES_2D = ["vmamba_tiny", "localvmamba_tiny", "himamba_tiny", "vim_small", "mambar_small"]
FAMILIES_3D = ["segmamba_tiny", "vmamba3d_tiny"]


def _create(name):
    import mamba_dense.encoders  # noqa: F401  (registers the models)
    from mamba_dense.encoders import create_encoder

    return create_encoder(name)


def finite_check(dev, rows):
    for name in FAMILIES_2D:
        for size, batch in ((224, 4), (512, 2)):
            torch.manual_seed(0)
            try:
                model = _create(name).to(dev).train()
                x = torch.randn(batch, 3, size, size, device=dev)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    feats = model.forward_intermediates(x, intermediates_only=True)
                    loss = sum(f.float().square().mean() for f in feats)
                loss.backward()
                ok = bool(torch.isfinite(loss)) and all(
                    p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters()
                )
                msg = ""
            except Exception as e:  # report, go on
                ok, msg = False, f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(dict(model=name, size=size, batch=batch, finite=ok, error=msg))
            print(f"{name:20s} {size:4d} b{batch}  fwd+bwd bf16 finite={ok} {msg}", flush=True)
            del model
            torch.cuda.empty_cache()
    for name in FAMILIES_3D:
        try:
            model = _create(name).to(dev).train()
            x = torch.randn(1, 1 if "segmamba" in name else 1, 64, 64, 64, device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = model.forward_intermediates(x, intermediates_only=True) if hasattr(model, "forward_intermediates") else model(x)
                loss = sum(f.float().square().mean() for f in feats)
            loss.backward()
            ok, msg = bool(torch.isfinite(loss)), ""
        except Exception as e:
            ok, msg = False, f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(dict(model=name, size=64, batch=1, finite=ok, error=msg))
        print(f"{name:20s} 64^3 b1 fwd+bwd bf16 finite={ok} {msg}", flush=True)


def throughput(dev, rows, name="vmamba_tiny", size=224, batch=64, steps=20):
    """Backbone training throughput (bf16 autocast, channels_last, AdamW): model_profile's bench."""
    from model_profile import bench

    r = bench(name, size, batch, dev, steps=steps)
    rows.append(dict(model=name, size=size, batch=batch, train_images_per_s=r["images_per_s"], peak_GiB=r["peak_GiB"]))
    print(f"{name} train {size}px b{batch}: {r['images_per_s']:.0f} images/s, peak {r['peak_GiB']:.1f} GiB", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    import triton

    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), cmd=" ".join(sys.argv))
    print(info, flush=True)
    rows: list = []
    finite_check(dev, rows)
    try:
        throughput(dev, rows)
    except Exception as e:
        print(f"throughput failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "encoders.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
