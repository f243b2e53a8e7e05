"""DDP scaling of the ADE20K UPerNet recipe: `mamba-dense fit` on 1 and on 2 GPUs, same per-GPU batch.

To run (a 2-GPU machine, repo root; the CLI needs jsonargparse, albumentations, pycocotools, nibabel
and smp, carried as wheels in .bench_deps and .bench_deps/ddp):
    python3 -m pip install -q --no-deps .bench_deps/*.whl .bench_deps/ddp/*.whl
    python3 benchmarks/ddp.py --out $OUT                    # ~4 min on 2 x H200

Where a 2-GPU step spends its extra time: add ``--profile`` (every rank writes a kernel table and
device ms per step by group: NCCL, scan, loss, GEMM/conv, memcpy, other; host wall ms per step).

CPU smoke mode (tiny data and model; one process, then two processes over gloo):
    OMP_NUM_THREADS=1 python3 benchmarks/ddp.py --accelerator cpu --devices 1 --smoke --out /tmp/ddp_smoke
    OMP_NUM_THREADS=1 python3 benchmarks/ddp.py --accelerator cpu --devices 1 2 --smoke --out /tmp/ddp_smoke

What it does:
1. writes a synthetic dataset in the ADE20K layout (``write_ade20k_like``: JPEG images of 512-683 px
   a side, like ADE20K's, with PNG annotations of 150 classes + "other"; enough images that no run
   reaches the end of an epoch), in parallel, into a temp folder (or reuses ``--data-root``);
2. for each ``--devices`` count runs the real CLI (``benchmarks/_lightning_cli.py`` = the
   ``mamba-dense`` entry point) as a subprocess:
   ``fit --config configs/ade20k/upernet_vmamba_tiny_512x512_160k.yaml`` with only these overrides:
   data root, per-device ``batch_size`` (``--batch-size``, default 8: 2 GPUs x 8 = the recipe's
   batch 16), ``num_workers`` per rank, ``trainer.devices``, ``max_steps`` = ``--skip`` +
   ``--steps``, no validation, no progress bar, a run folder under the temp folder, and the
   ``StepTimer`` callback. Everything else is the recipe's: DDP, SyncBatchNorm (the CLI's ``NoHostSyncBatchNorm``), ``precision``
   32-true (``--precision`` to change it), AdamW, the data pipeline with its random resize, crop,
   flip and photometric distortion;
3. reads the steady-state step times (steps after ``--skip``; median of the intervals between step
   ends, after a device synchronize) and reports images/s = devices x batch / median step time and
   scaling = images/s on 2 GPUs / images/s on 1 (target: at least 1.8).

DataLoader workers: ``--num-workers`` per rank (default: cores / (2 x the largest device count),
at most 8: 8 per rank on a 32-core 2-GPU host, the rest left to the ranks' main processes and
the pinning threads); the same per rank in every run, so the 1-GPU run is not starved or favoured.
On CPU (``--accelerator cpu``) SyncBatchNorm is turned off (PyTorch's SyncBatchNorm needs a GPU) and
DDP uses gloo. Writes ``ddp.json`` (environment, settings, every run's step times) and each run's
log ``ddp_d<N>.log`` to ``--out`` (default $OUT, else the current folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401  (mamba_dense importable without an install)

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(__file__).resolve().parent / "_lightning_cli.py"
CONFIG = "configs/ade20k/upernet_vmamba_tiny_512x512_160k.yaml"
# NVLink multicast stays off on shared hosts (NCCL NVLS can take a host's GPUs down); children inherit these.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _write_shard(job: tuple[str, int, int, tuple[int, int], int]) -> str:
    from mamba_dense.datamodules import write_ade20k_like

    root, num_train, num_val, size_range, seed = job
    return str(write_ade20k_like(root, num_train=num_train, num_val=num_val, num_classes=150,
                                 size_range=size_range, seed=seed, quirks=seed == 0))


def write_dataset(root: Path, num_train: int, size_range: tuple[int, int], workers: int) -> Path:
    """ADE20K layout with ``num_train`` training images (2 validation), written by ``workers``
    processes in shards (different seeds) that are then moved into one folder."""
    final = root / "ADEChallengeData2016"
    if final.exists():
        return final
    workers = max(1, min(workers, num_train))
    counts = [num_train // workers + (k < num_train % workers) for k in range(workers)]
    jobs = [(str(root / f"shard{k}"), n, 2 if k == 0 else 0, size_range, k) for k, n in enumerate(counts) if n]
    with ProcessPoolExecutor(len(jobs)) as pool:
        shards = list(pool.map(_write_shard, jobs))
    tmp = root / "merge.partial"
    for k, shard in enumerate(shards):
        for kind in ("images", "annotations"):
            for split in ("training", "validation"):
                dst = tmp / kind / split
                dst.mkdir(parents=True, exist_ok=True)
                for f in (Path(shard) / kind / split).iterdir():
                    name = f.name if f.name.startswith("._") else f"s{k}_{f.name}"
                    shutil.move(str(f), dst / name)
        shutil.rmtree(Path(shard).parent)
    os.replace(tmp, final)
    return final


def cli_args(args: argparse.Namespace, devices: int, data_root: Path, run_dir: Path, timer_json: Path) -> list[str]:
    """The `mamba-dense fit` command line for one run: the recipe plus the benchmark's overrides."""
    timer = {"class_path": "_lightning_cli.StepTimer", "init_args": {"path": str(timer_json), "skip": args.skip}}
    cmd = [
        "fit", "--config", str(ROOT / args.config),
        "--data.init_args.root", str(data_root),
        "--data.init_args.batch_size", str(args.batch_size),
        "--data.init_args.num_workers", str(args.num_workers),
        "--trainer.accelerator", args.accelerator,
        "--trainer.devices", str(devices),
        "--trainer.max_steps", str(args.skip + args.steps),
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        f"--trainer.callbacks+={json.dumps(timer)}",
    ]
    if args.profile:
        prof = {"class_path": "_lightning_cli.StepProfiler",
                "init_args": {"prefix": str(Path(args.out_dir) / f"profile_d{devices}"), "start": args.skip,
                              "steps": min(5, args.steps)}}
        cmd.append(f"--trainer.callbacks+={json.dumps(prof)}")
    if args.precision:
        cmd += ["--trainer.precision", args.precision]
    if args.accelerator == "cpu":
        cmd += ["--trainer.sync_batchnorm", "false"]  # torch's SyncBatchNorm runs on GPUs only
    if args.smoke:  # a narrow model, small crops, few classes of work: the plumbing, not the numbers
        cmd += [
            "--data.init_args.crop_size", "64",
            "--data.init_args.scale", "[128, 64]",
            "--model.init_args.encoder_kwargs", json.dumps({"feature_norms": True, "dims": 16, "depths": [1, 1, 1, 1]}),
            "--model.init_args.head_kwargs", json.dumps({"channels": 32, "pool_scales": [1, 2], "norm": "batchnorm"}),
        ]
    return cmd + list(args.extra)


def run(args: argparse.Namespace, devices: int, data_root: Path, work: Path, out: Path) -> dict:
    run_dir = work / f"run_d{devices}"
    timer_json = run_dir / "steps.json"
    cmd = [sys.executable, str(CLI), *cli_args(args, devices, data_root, run_dir, timer_json)]
    env = {**os.environ, **NO_MULTICAST}
    log_path = out / f"ddp_d{devices}.log"
    print(f"\n== {devices} device(s): {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # its own process group: on a timeout the ranks Lightning started go down with it
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | str = proc.wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    wall = time.perf_counter() - start
    result: dict = {"devices": devices, "returncode": code, "wall_s": round(wall, 1), "command": cmd[1:]}
    if timer_json.exists():
        result.update(json.loads(timer_json.read_text()))
    else:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        result["error"] = "no step timings written; log tail:\n" + "\n".join(tail)
    msg = (f"{result['images_per_s']:.2f} images/s, median step {1e3 * result['step_s_median']:.1f} ms, "
           f"data wait {1e3 * result['data_wait_s_mean']:.1f} ms/step" if "images_per_s" in result
           else result.get("error", "no result"))
    print(f"   exit {code} after {wall:.0f} s: {msg}", flush=True)
    return result


def environment(args: argparse.Namespace) -> dict:
    import lightning
    import torch

    try:  # NOTE: not torch.cuda: this process stays off the GPUs (no context on GPU 0 during the runs)
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        gpus = []
    return {"gpus": gpus, "torch": torch.__version__, "lightning": lightning.__version__,
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(["python3", *sys.argv]), "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=CONFIG, help="recipe, relative to the repo root")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts to run, in order")
    p.add_argument("--accelerator", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--batch-size", type=int, default=None, help="per device (default 8; smoke 1)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per rank (default: see above)")
    p.add_argument("--skip", type=int, default=None, help="steps left out of the timing (default 10; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 3)")
    p.add_argument("--precision", default=None, help="override the recipe's trainer.precision (32-true)")
    p.add_argument("--num-images", type=int, default=None,
                   help="synthetic training images (default: enough for every step of the largest run)")
    p.add_argument("--data-root", default=None, help="an existing ADE20K-layout dataset (nothing is written)")
    p.add_argument("--smoke", action="store_true", help="tiny images, model and run (CPU check of the plumbing)")
    p.add_argument("--timeout-s", type=float, default=270, help="per run (two runs fit a 10-minute call)")
    p.add_argument("--profile", action="store_true",
                   help="also profile 5 steps after --skip on every rank (profile_d<N>_rank<r>.{txt,json} in --out; "
                        "the profiled steps are slower, so time and profile in separate runs)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (data, run folders)")
    p.add_argument("--out", default=None, help="folder for ddp.json and the logs (default $OUT or .)")
    p.add_argument("extra", nargs="*", help="more CLI arguments after --, e.g. -- --trainer.precision=bf16-mixed")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (1 if args.smoke else 8)
    args.skip = args.skip if args.skip is not None else (1 if args.smoke else 10)
    args.steps = args.steps or (3 if args.smoke else 30)
    cores = os.cpu_count() or 2
    if args.num_workers is None:
        args.num_workers = 0 if args.smoke else max(1, min(8, cores // (2 * max(args.devices))))
    steps = args.skip + args.steps
    num_images = args.num_images or steps * args.batch_size * max(args.devices) + 8
    out = Path(args.out or os.environ.get("OUT") or ".")
    args.out_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    result: dict = {"env": environment(args), "settings": {k: v for k, v in vars(args).items() if k != "out"},
                    "runs": []}
    print(result["env"], flush=True)
    try:
        if args.data_root:
            data_root = Path(args.data_root)
        else:
            t = time.perf_counter()
            size_range = (64, 96) if args.smoke else (512, 683)
            data_root = write_dataset(work / "ade", num_images, size_range, workers=max(1, min(16, cores - 1)))
            result["settings"]["synthetic"] = {"images": num_images, "size_range": list(size_range),
                                               "write_s": round(time.perf_counter() - t, 1)}
            print(f"wrote {num_images} synthetic ADE20K-layout images ({size_range[0]}-{size_range[1]} px) "
                  f"in {time.perf_counter() - t:.0f} s", flush=True)
        for devices in args.devices:
            result["runs"].append(run(args, devices, data_root, work, out))
            (out / "ddp.json").write_text(json.dumps(result, indent=1))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    ok = {r["devices"]: r for r in result["runs"] if "images_per_s" in r}
    print(f"\n{args.config}: {args.accelerator}, per-device batch {args.batch_size}, {args.num_workers} workers/rank, "
          f"{args.steps} timed steps after {args.skip}")
    print(f"{'devices':>7} {'images/s':>9} {'step ms':>8} {'data wait ms':>13} {'1st step s':>11} {'run s':>6}")
    for r in result["runs"]:
        if r["devices"] in ok:
            first = r["fit_start_to_first_step_end_s"] or 0
            print(f"{r['devices']:>7} {r['images_per_s']:>9.2f} {1e3 * r['step_s_median']:>8.1f} "
                  f"{1e3 * r['data_wait_s_mean']:>13.1f} {first:>11.1f} {r['wall_s']:>6.0f}")
        else:
            print(f"{r['devices']:>7} failed (exit {r['returncode']}): see ddp_d{r['devices']}.log")
    if 1 in ok and len(ok) > 1:
        result["scaling"] = {n: ok[n]["images_per_s"] / ok[1]["images_per_s"] for n in ok if n != 1}
        for n, s in result["scaling"].items():
            verdict = "" if args.smoke or n != 2 else f" (target >= 1.8: {'met' if s >= 1.8 else 'NOT met'})"
            print(f"scaling 1 -> {n} devices: {s:.2f}x images/s{verdict}")
    (out / "ddp.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'ddp.json'}")
    return result


if __name__ == "__main__":
    main()
