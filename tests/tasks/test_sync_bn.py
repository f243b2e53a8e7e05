"""SyncBatchNorm without host syncs: conversion (CPU), and its numbers against plain batch norm (GPU)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mamba_dense.heads.upernet import PooledBatchNorm2d
from mamba_dense.tasks.sync_bn import NoHostSyncBatchNorm, PooledSyncBatchNorm, SyncBatchNorm, _SyncBatchNormFunction


def test_plugin_converts_every_batch_norm_and_reverts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), PooledBatchNorm2d(4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].weight.uniform_(0.5, 2)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = NoHostSyncBatchNorm()
    conv = plugin.apply(model)
    bns = [m for m in conv.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # the pooled norm (UPerNet's 1x1 PSP branch) keeps its one-value fallback
    assert [type(m) for m in bns] == [SyncBatchNorm, PooledSyncBatchNorm, SyncBatchNorm]
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in ref.items())
    # outside distributed training it is PyTorch's batch norm (CPU, no process group)
    x = torch.randn(2, 3, 8, 8) * 2 + 3
    conv.train()
    y = conv[:4](x)
    assert torch.isfinite(y).all() and y.shape == (2, 4, 6, 6)
    one = torch.randn(1, 4, 1, 1)  # one value per channel, not synchronized: running statistics, not an error
    expect = F.batch_norm(one, conv[3].running_mean, conv[3].running_var, conv[3].weight, conv[3].bias, False, 0.0,
                          conv[3].eps)
    assert torch.equal(conv[3](one), expect)
    back = plugin.revert(conv)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    assert set(back.state_dict()) == set(ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_against_batch_norm(rank: int, world: int, port: int, shard_sizes: list[int]) -> None:
    """Every rank holds its shard of one global batch; our SyncBatchNorm on the shards must equal plain
    batch norm on the whole batch: outputs, input and parameter gradients, running statistics."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        gen = torch.Generator().manual_seed(0)
        n = sum(shard_sizes)
        x_all = (torch.randn(n, 6, 5, 7, generator=gen) * 3 + 2).to(dev)
        dy_all = torch.randn(n, 6, 5, 7, generator=gen).to(dev)
        w = (torch.rand(6, generator=gen) + 0.5).to(dev)
        b = torch.randn(6, generator=gen).to(dev)
        lo = sum(shard_sizes[:rank])
        sl = slice(lo, lo + shard_sizes[rank])

        bn = SyncBatchNorm(6, momentum=0.1).to(dev).train()
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        x = x_all[sl].clone().requires_grad_()
        y = bn(x)
        y.backward(dy_all[sl])
        # an empty rank's backward leaves the parameter gradients unset (zeros for DDP)
        gw = bn.weight.grad.clone() if bn.weight.grad is not None else torch.zeros_like(w)
        gb = bn.bias.grad.clone() if bn.bias.grad is not None else torch.zeros_like(b)
        dist.all_reduce(gw)  # what DDP does with parameter gradients
        dist.all_reduce(gb)

        xr = x_all.clone().double().requires_grad_()
        wr, br = w.double().requires_grad_(), b.double().requires_grad_()
        rm, rv = torch.zeros(6, dtype=torch.float64, device=dev), torch.ones(6, dtype=torch.float64, device=dev)
        yr = F.batch_norm(xr, rm, rv, wr, br, True, 0.1, bn.eps)
        yr.backward(dy_all.double())

        def rel(a, r):
            return ((a.double() - r).norm() / r.norm()).item()

        if shard_sizes[rank]:
            assert rel(y, yr[sl]) < 1e-5 and rel(x.grad, xr.grad[sl]) < 1e-5
        assert rel(gw, wr.grad) < 1e-5 and rel(gb, br.grad) < 1e-5
        assert rel(bn.running_mean, rm) < 1e-5 and rel(bn.running_var, rv) < 1e-5
        assert bn.num_batches_tracked.item() == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL process group needs a GPU")
def test_single_rank_function_matches_batch_norm():
    # the autograd function itself with one rank (the module hands one rank to PyTorch's batch norm)
    port = _free_port()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        dev = torch.device("cuda")
        torch.manual_seed(0)
        x = (torch.randn(4, 5, 6, 7, device=dev) * 3 + 2).requires_grad_()
        w = (torch.rand(5, device=dev) + 0.5).requires_grad_()
        b = torch.randn(5, device=dev).requires_grad_()
        rm, rv = torch.zeros(5, device=dev), torch.ones(5, device=dev)
        y = _SyncBatchNormFunction.apply(x, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD, 1)
        dy = torch.randn_like(y)
        g = torch.autograd.grad(y, (x, w, b), dy)
        xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
        rmr, rvr = torch.zeros(5, dtype=torch.float64, device=dev), torch.ones(5, dtype=torch.float64, device=dev)
        yr = F.batch_norm(xr, rmr, rvr, wr, br, True, 0.1, 1e-5)
        gr = torch.autograd.grad(yr, (xr, wr, br), dy.double())
        for a, r in [(y, yr), *zip(g, gr), (rm, rmr), (rv, rvr)]:
            assert ((a.double() - r).norm() / r.norm()).item() < 1e-5
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("shards", [[3, 5], [4, 0]], ids=["uneven", "empty-rank"])
def test_two_ranks_match_batch_norm_of_the_whole_batch(shards):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared hosts
    torch.multiprocessing.spawn(_check_against_batch_norm, args=(2, _free_port(), shards), nprocs=2, join=True)
