"""SyncBatchNorm without a device-to-host synchronization per layer, and its Lightning plugin.

PyTorch's ``SyncBatchNorm`` gathers every rank's (mean, invstd, count) and then drops the ranks
whose input was empty with a boolean mask (``count_all[count_all >= 1]``). The mask's result has a
data-dependent shape, so every SyncBatchNorm layer waits, in its forward, for the GPU to finish all
queued work. The UPerNet head has 13 of them: in a 2-GPU step the host can never run ahead of the
GPU, and host launch time adds to device time (``benchmarks/ddp.py --profile``).

Here the gathered statistics are merged without dropping anything: an empty rank contributes count 0
(and a finite placeholder invstd of 1), which the count-weighted merge of
``torch.batch_norm_gather_stats_with_counts`` ignores. Same kernels, same numbers, no host sync.
The backward is PyTorch's own (it has no host sync).

``mamba-dense fit`` uses it whenever a config sets ``trainer.sync_batchnorm: true`` (see
``mamba_dense.cli``); in plain Lightning pass ``plugins=[NoHostSyncBatchNorm()]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor, nn
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNormFunction

from ..heads.upernet import PooledBatchNorm2d

__all__ = ["SyncBatchNorm", "PooledSyncBatchNorm", "NoHostSyncBatchNorm"]


class _SyncBatchNormFunction(_TorchSyncBatchNormFunction):
    """PyTorch's SyncBatchNorm autograd function with a forward that never reads device values."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size):  # type: ignore[override]
        if not (x.is_contiguous(memory_format=torch.channels_last)
                or x.is_contiguous(memory_format=torch.channels_last_3d)):
            x = x.contiguous()
        if weight is not None:
            weight = weight.contiguous()
        C = x.shape[1]
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if x.numel() > 0:
            mean, invstd = torch.batch_norm_stats(x, eps)
            count = torch.full((1,), x.numel() // C, dtype=mean.dtype, device=x.device)
            local = torch.cat([mean, invstd, count])
        else:  # still takes part in the collective, with count 0
            local = torch.zeros(2 * C + 1, dtype=stat_dtype, device=x.device)
        gathered = local.new_empty(world_size, local.numel())
        dist.all_gather_into_tensor(gathered, local, group=process_group)
        mean_all, invstd_all, count_all = torch.split(gathered, C, dim=1)
        # count 0 weighs a rank out of the merge; its invstd only has to be finite (1 / invstd^2 is used)
        invstd_all = torch.where(count_all > 0, invstd_all, torch.ones_like(invstd_all))
        counts = count_all.reshape(-1)
        if running_mean is not None and counts.dtype != running_mean.dtype:
            counts = counts.to(running_mean.dtype)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(
            x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts
        )
        ctx.save_for_backward(x, weight, mean, invstd, count_all.reshape(-1).to(torch.int32))
        ctx.process_group = process_group
        if x.numel() == 0:
            return torch.empty_like(x)
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)


class SyncBatchNorm(nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` whose distributed training forward has no host sync.

    Same parameters, buffers and state dict as ``torch.nn.SyncBatchNorm``; outside distributed
    training (eval, one process, one rank, CPU) it is PyTorch's forward.
    """

    def _sync_group(self) -> object | None:
        """The process group a training forward synchronizes over, or None (one process / rank)."""
        group = self.process_group
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        return group if self.training and group is not None and dist.get_world_size(group) > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        group = self._sync_group()
        if group is None or not x.is_cuda:
            return super().forward(x)
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average: one host read, as in PyTorch
                momentum = 1.0 / self.num_batches_tracked.item()
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, running_mean, running_var, self.eps, momentum or 0.0,
            group, dist.get_world_size(group),
        )


class NoHostSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning ``LayerSync`` plugin: every batch norm becomes :class:`SyncBatchNorm` (``revert`` is
    Lightning's, which handles any ``torch.nn.SyncBatchNorm``)."""

    def apply(self, model: nn.Module) -> nn.Module:
        pooled = {name for name, m in model.named_modules() if isinstance(m, PooledBatchNorm2d)}
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for name, m in model.named_modules():
            if type(m) is nn.SyncBatchNorm:  # same attributes; only forward differs
                m.__class__ = PooledSyncBatchNorm if name in pooled else SyncBatchNorm
        return model


class PooledSyncBatchNorm(SyncBatchNorm):
    """:class:`SyncBatchNorm` made from a ``PooledBatchNorm2d`` (UPerNet's 1x1 PSP branch): a training batch
    with one value per channel that is not synchronized across processes (one device, batch 1) is
    normalized with the running statistics, as ``PooledBatchNorm2d`` does, instead of failing."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] == 1 and self._sync_group() is None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)
