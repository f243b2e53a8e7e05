"""Training guards: stop on a non-finite loss with a diagnosis, explain out-of-memory errors, and write
checkpoints atomically."""

from __future__ import annotations

import os
import uuid
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mamba_dense.convert import unreadable_error

FIXES = (
    "lower the learning rate (or lengthen the warmup), train in bf16 (`--trainer.precision=bf16-mixed`) "
    "instead of fp16, or clip gradients (`--trainer.gradient_clip_val=1.0`)"
)


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


def first_nonfinite(module: torch.nn.Module) -> list[str]:
    """Names of the first non-finite parameter, gradient and floating buffer (any may be absent)."""
    found: dict[str, str] = {}
    for name, p in module.named_parameters():
        if "parameter" not in found and not torch.isfinite(p.detach()).all():
            found["parameter"] = f"parameter {name}"
        if "gradient" not in found and p.grad is not None and not torch.isfinite(p.grad).all():
            found["gradient"] = f"gradient of {name}"
        if len(found) == 2:
            break
    for name, b in module.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            found["buffer"] = f"buffer {name}"
            break
    return list(found.values())


def _norms(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose buffers a training forward updates: batch norms (running statistics, counters)."""
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]


class NonFiniteGuard(pl.Callback):
    """Stops training at the first NaN/inf training loss, after saving a checkpoint to debug from.

    The loss is checked before its backward pass (any rank, in distributed runs), so nothing of
    the bad step has touched the weights yet; the batch norms' running statistics, which the bad
    forward did update, are put back from a copy taken at the start of the step. When the loss is NaN
    or inf the guard saves `<log dir>/nonfinite-step<S>.ckpt` (the weights, running statistics and
    optimizer state that gave this loss on this batch), names the first non-finite parameter or
    buffer if one is, and raises a RuntimeError naming
    the step, epoch, batch, offending tensors and checkpoint, with fixes to try. `mamba-dense`
    adds it to every run.

    Example:
        >>> trainer = pl.Trainer(callbacks=[NonFiniteGuard()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._step = 0
        self._batch_idx = 0
        self.checkpoint_path: str | None = None
        self._owner: pl.LightningModule | None = None
        self._norm_modules: list[torch.nn.Module] = []
        self._stats: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step, self._batch_idx = trainer.global_step, batch_idx
        if self._owner is not pl_module:  # the module walk once per model, not per step
            self._owner, self._norm_modules = pl_module, _norms(pl_module)
        stats = [b for m in self._norm_modules for b in m.buffers(recurse=False)]
        if len(stats) != len(self._stats) or any(a is not b for a, b in zip(stats, self._stats)):
            self._stats, self._saved = stats, [b.detach().clone() for b in stats]
        elif stats:
            with torch.no_grad():  # a device copy (kilobytes), no host sync
                torch._foreach_copy_(self._saved, [b.detach() for b in stats])

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # NOTE: here, not in on_train_batch_end: by then the optimizer had applied the NaN step and
        # the debug checkpoint held non-finite weights everywhere
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        if self._stats and len(self._stats) == len(self._saved):
            with torch.no_grad():  # the running statistics from before this step's forward
                torch._foreach_copy_(self._stats, self._saved)
        # what was non-finite before this step (the bad forward's own running-statistics updates are undone)
        culprits = [f"loss = {loss.item()}" if bad else "loss on another rank"] + first_nonfinite(pl_module)
        root = trainer.log_dir or trainer.default_root_dir
        path = os.path.join(root, f"nonfinite-step{self._step}.ckpt")
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        raise RuntimeError(
            f"Non-finite training loss at global step {self._step} (epoch {trainer.current_epoch}, "
            f"batch {self._batch_idx}): {', '.join(culprits)}. Checkpoint of the weights before this step "
            f"saved to {path}. To fix: {FIXES}."
        )


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint path (``--ckpt_path``) that names no file; the message gives the fix."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that never leaves a truncated checkpoint under the final name.

    Local checkpoints are written to a temporary file in the target directory, fsynced, then
    `os.replace`d onto the target; a kill or an error while saving leaves the previous file (or
    none). Remote (fsspec) paths fall back to `TorchCheckpointIO`. `mamba-dense` uses it unless
    the config gives its own CheckpointIO plugin.

    Example:
        >>> trainer = pl.Trainer(plugins=[AtomicCheckpointIO()])  # doctest: +SKIP
    """

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """TorchCheckpointIO's load; a truncated or foreign file raises CorruptCheckpointError naming it."""
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as err:
            clear = unreadable_error(path, err)
            if clear is None:
                raise
            raise clear from err

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support `storage_options`.")
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # NOTE: same directory, so os.replace is a rename within one filesystem (atomic on POSIX)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


_OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, or a RuntimeError that reports one (CPU allocator, cuDNN, cuBLAS)."""
    return isinstance(err, _OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MESSAGES))


def _inputs(batch: Any) -> tuple[int, str] | None:
    """(batch size, input shape) of a batch: a dict's "image", a tuple's first item, or a tensor;
    the images may be a list of (C, H, W) tensors of different sizes (detection)."""
    x = batch
    if isinstance(batch, dict):
        x = batch.get("image", next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim >= 3), None))
    elif isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
    if isinstance(x, torch.Tensor) and x.ndim >= 3:
        return x.shape[0], f"{'x'.join(map(str, x.shape[1:]))} ({x.dtype})"
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) and t.ndim >= 2 for t in x):
        largest = max(x, key=lambda t: t.numel())
        return len(x), f"up to {'x'.join(map(str, largest.shape))} ({largest.dtype})"
    return None


def _flag(name: str, value: Any) -> str:
    return f"`--{name} {value}`"


class OutOfMemoryGuard(pl.Callback):
    """Adds to an out-of-memory error what caused it and how to fix it.

    The guard notes the stage and batch shape of every step (training, validation, test, predict).
    When fit / validate / test / predict ends in an out-of-memory error (`torch.OutOfMemoryError`,
    or a RuntimeError reporting one), its message gets a paragraph naming the step, the device's
    memory (peak allocated / total on CUDA), the batch size and input size of that batch, the
    datamodule's batch size and crop / patch size, the precision and gradient accumulation, and the
    fixes to try for that stage (smaller batch with accumulation, smaller crop / patch, bf16-mixed,
    activation checkpointing; for evaluation a smaller evaluation batch or sliding window). The
    error keeps its type. `mamba-dense` adds it to every run.

    Example:
        >>> trainer = pl.Trainer(callbacks=[OutOfMemoryGuard()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[str, tuple[int, str] | None, int] | None = None
        self.report: str | None = None

    def _seen(self, stage: str, batch: Any, batch_idx: int) -> None:
        self._last = (stage, _inputs(batch), batch_idx)  # NOTE: shapes only: holding the batch would hold memory

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._seen("training", batch, batch_idx)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._seen("validation", batch, batch_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._seen("test", batch, batch_idx)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._seen("predict", batch, batch_idx)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not is_out_of_memory(exception):
            return
        self.report = self.describe(trainer, pl_module)
        first = str(exception.args[0]) if exception.args else ""
        exception.args = (f"{first}\n\n{self.report}", *exception.args[1:])  # NOTE: str(err) shows it (3.10 too)

    def describe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """The paragraph added to the error: what ran out of memory, with what, and the fixes."""
        stage, inputs, batch_idx = self._last if self._last is not None else (None, None, -1)
        dm = trainer.datamodule
        where = f"{stage} batch {batch_idx}" if stage else "before the first batch (model set-up?)"
        if stage == "training":
            where = f"training step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"
        device = trainer.strategy.root_device
        memory = ""
        if device.type == "cuda":
            gib = 2.0**30
            memory = (f" [peak {torch.cuda.max_memory_allocated(device) / gib:.1f} GiB allocated of "
                      f"{torch.cuda.get_device_properties(device).total_memory / gib:.1f} GiB]")
        facts = []
        if inputs is not None:
            facts.append(f"batch of {inputs[0]} input(s) of {inputs[1]}")
        data_sizes = {k: getattr(dm, k) for k in ("batch_size", "val_batch_size", "crop_size", "patch_size")
                      if dm is not None and getattr(dm, k, None) is not None}
        if data_sizes:
            facts.append("data " + ", ".join(f"{k}={v}" for k, v in data_sizes.items()))
        facts.append(f"precision {trainer.precision}")
        if stage == "training":
            facts.append(f"accumulate_grad_batches {trainer.accumulate_grad_batches}")
        fixes = self._fixes(trainer, pl_module, stage, inputs, data_sizes)
        return (f"Out of memory in {where} on {device}{memory}: {'; '.join(facts)}. "
                f"To fix, try (one at a time): {'; '.join(fixes)}.")

    @staticmethod
    def _fixes(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str | None, inputs: tuple[int, str] | None,
               data_sizes: dict[str, Any]) -> list[str]:
        fixes = []
        size_key = "patch_size" if "patch_size" in data_sizes else "crop_size" if "crop_size" in data_sizes else None
        if stage in (None, "training"):
            batch_size = data_sizes.get("batch_size", inputs[0] if inputs else None)
            acc = trainer.accumulate_grad_batches
            if batch_size and batch_size > 1:
                half = next(d for d in range(batch_size // 2, 0, -1) if batch_size % d == 0)  # keeps the product
                fixes.append(f"a smaller batch, {_flag('data.init_args.batch_size', half)} with "
                             f"{_flag('trainer.accumulate_grad_batches', acc * batch_size // half)} to keep the "
                             f"effective batch of {batch_size * acc}")
            if size_key:
                fixes.append(f"a smaller {size_key.replace('_', ' ')} ({_flag('data.init_args.' + size_key, '...')}, "
                             f"now {data_sizes[size_key]})")
        else:
            if data_sizes.get("val_batch_size", 1) > 1:
                fixes.append(f"a smaller evaluation batch ({_flag('data.init_args.val_batch_size', 1)})")
            if getattr(pl_module, "inference_mode", "slide") != "slide":  # semantic task
                fixes.append(f"sliding-window evaluation ({_flag('model.init_args.inference_mode', 'slide')} "
                             f"with {_flag('model.init_args.window_size', '...')})")
            if getattr(pl_module, "sw_batch_size", 1) > 1:  # volumetric task
                fixes.append(f"fewer windows at once ({_flag('model.init_args.sw_batch_size', 1)})")
            if getattr(pl_module, "sw_buffer_device", "cpu") != "cpu":
                flag = _flag("model.init_args.sw_buffer_device", "cpu")
                fixes.append(f"the sliding-window buffers on the CPU ({flag})")
        if "16" not in str(trainer.precision):
            fixes.append(f"mixed precision ({_flag('trainer.precision', 'bf16-mixed')})")
        if stage in (None, "training") and "grad_checkpointing" in getattr(pl_module, "hparams", {}):
            if not pl_module.hparams.grad_checkpointing:
                fixes.append("activation checkpointing of the encoder "
                             f"({_flag('model.init_args.grad_checkpointing', 'true')}: recomputes its blocks in backward)")
        elif stage in (None, "training"):
            name = next((n for n, m in pl_module.named_modules()
                         if hasattr(m, "set_grad_checkpointing") and not getattr(m, "grad_checkpointing", False)), None)
            if name is not None:
                fixes.append(f"activation checkpointing (`{name}.set_grad_checkpointing()` on the LightningModule, "
                             "e.g. in a subclass's `configure_model`: recomputes the blocks in backward)")
        if trainer.world_size == 1 and stage in (None, "training") and trainer.strategy.root_device.type == "cuda":
            fixes.append("more GPUs with DDP, keeping devices x batch_size")
        return fixes
