"""The ``mamba-dense`` console script for a checkout without an install, and a step-timing callback.

To run (repo root; the same arguments as ``mamba-dense``):
    python3 benchmarks/_lightning_cli.py fit --config configs/demo/shapes.yaml \
        --trainer.callbacks+='{"class_path": "_lightning_cli.StepTimer", "init_args": {"path": "steps.json"}}'

``benchmarks/ddp.py`` runs it once per device count. Lightning's DDP launcher starts the other ranks
by re-running this script with the same arguments, and the callback's class path resolves because
the script's folder is on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401  (mamba_dense importable without an install)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402


class StepTimer(pl.Callback):
    """Wall-clock time of every training step on rank 0, written to a JSON file when training ends.

    Timestamps are taken after a device synchronize at the start and at the end of each training
    batch (the step's forward, backward, gradient all-reduce and optimizer step lie between them; the
    time from one step's end to the next one's start is the wait for the data and the loop's own work).

    Args:
        path: JSON file to write (rank 0 only).
        skip: steps left out of the steady-state figures (start-up, kernel compilation, allocator).
    """

    def __init__(self, path: str, skip: int = 10) -> None:
        super().__init__()
        self.path, self.skip = path, skip
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.batch: int | None = None
        self.t_fit = 0.0

    @staticmethod
    def _sync(module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t_fit = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._sync(pl_module)
        self.starts.append(time.perf_counter())
        if self.batch is None:
            self.batch = int(batch["image"].shape[0]) if isinstance(batch, dict) else len(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sync(pl_module)
        self.ends.append(time.perf_counter())

    def summary(self, world_size: int) -> dict[str, Any]:
        """Steady-state figures over the steps after ``skip``: intervals between consecutive step ends."""
        ends, starts = self.ends, self.starts
        first = max(self.skip, 1)  # step i lasts from the end of step i - 1 to its own end
        intervals = [ends[i] - ends[i - 1] for i in range(first, len(ends))]
        waits = [starts[i] - ends[i - 1] for i in range(first, min(len(ends), len(starts)))]
        global_batch = (self.batch or 0) * world_size
        out: dict[str, Any] = {"steps": len(ends), "skip": self.skip, "per_device_batch": self.batch,
                               "world_size": world_size, "global_batch": global_batch,
                               "fit_start_to_first_step_end_s": (ends[0] - self.t_fit) if ends else None,
                               "step_s": intervals, "data_wait_s": waits}
        if intervals:
            med = sorted(intervals)[len(intervals) // 2]
            mean = sum(intervals) / len(intervals)
            out.update(step_s_median=med, step_s_mean=mean, images_per_s=global_batch / med,
                       images_per_s_mean=global_batch / mean, data_wait_s_mean=sum(waits) / max(len(waits), 1))
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        info = self.summary(trainer.world_size)
        info.update(precision=str(trainer.precision), strategy=type(trainer.strategy).__name__,
                    device=torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else "cpu",
                    sync_batchnorm=any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()))
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        Path(tmp).write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.path)


class StepProfiler(pl.Callback):
    """torch.profiler over training steps [start, start + steps) on every rank; writes per rank a
    kernel table (``<prefix>_rank<r>.txt``) and a JSON summary (``<prefix>_rank<r>.json``): device
    time per step by group (NCCL collectives, the scan, GEMM/conv, the rest) and host wall time per
    step, to see where a multi-GPU step spends the time a 1-GPU step does not.

    Args:
        prefix: output path prefix.
        start: first profiled step (after warm-up).
        steps: number of profiled steps.
    """

    def __init__(self, prefix: str, start: int = 10, steps: int = 5) -> None:
        super().__init__()
        self.prefix, self.start, self.steps = prefix, start, steps
        self.prof = None
        self.t0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.prof is None or trainer.global_step < self.start + self.steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        wall = (time.perf_counter() - self.t0) / self.steps
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.start = 1 << 62  # once
        groups: dict[str, float] = {}
        for ev in prof.events():  # device-side events only (kernels, memcpy): no double counting of ops
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            k = ev.name.lower()
            g = ("nccl" if "nccl" in k
                 else "scan" if any(n in k for n in ("_fwd_kernel", "_bwd_kernel", "_carry", "_sum_routes"))
                 else "loss" if "_upce_" in k
                 else "gemm/conv" if any(n in k for n in ("gemm", "conv", "nvjet", "sm90", "cutlass"))
                 else "memcpy" if k.startswith(("memcpy", "memset"))
                 else "other")
            groups[g] = groups.get(g, 0.0) + ev.time_range.elapsed_us() / self.steps / 1e3
        rank = trainer.global_rank
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        sort = "cuda_time_total" if pl_module.device.type == "cuda" else "cpu_time_total"
        Path(f"{self.prefix}_rank{rank}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
        Path(f"{self.prefix}_rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "world_size": trainer.world_size, "steps": self.steps, "host_wall_ms_per_step": 1e3 * wall,
             "device_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}, indent=1))


if __name__ == "__main__":
    from mamba_dense.cli import main

    main()
