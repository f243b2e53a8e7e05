"""Activation checkpointing of the encoder (`grad_checkpointing: true`): same loss and gradients,
blocks really recomputed; an encoder without support gets a clear error."""

import pytest
import torch

from mamba_dense.encoders import _features
from mamba_dense.tasks import SemanticSegmentationTask


def _task(**kw):
    torch.manual_seed(0)
    return SemanticSegmentationTask(
        num_classes=4, encoder="vmamba_tiny", encoder_kwargs=dict(dims=8, depths=[1, 1, 1, 1]),
        drop_path_rate=0.0, head_kwargs=dict(channels=16, norm="groupnorm", dropout=0.0), aux_head=False, **kw,
    ).double()


def _grads(task):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = torch.randint(0, 4, (2, 64, 64))
    logits, _ = task._logits(images, with_aux=False)
    loss = task._loss(logits, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def test_checkpointed_encoder_matches_and_recomputes(monkeypatch):
    plain_loss, plain = _grads(_task())
    calls = []
    real = _features.checkpoint
    monkeypatch.setattr(_features, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ckpt_loss, ckpt = _grads(_task(grad_checkpointing=True))
    assert len(calls) == 4  # one block per stage, each checkpointed
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-12, atol=0)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-9, atol=1e-12, msg=n)


def test_encoder_without_checkpointing_is_a_clear_error():
    from mamba_dense.tasks._encoder import Encoder

    enc = Encoder("resnet18")  # timm's ResNet has set_grad_checkpointing: supported
    enc.set_grad_checkpointing(True)
    enc.model = torch.nn.Sequential(torch.nn.Identity())  # a backbone with no checkpointing support
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        enc.set_grad_checkpointing(True)


def test_instance_task_accepts_grad_checkpointing():
    from mamba_dense.tasks import InstanceSegmentationTask

    task = InstanceSegmentationTask(
        num_classes=3, encoder="vmamba_tiny", encoder_kwargs=dict(dims=8, depths=[1, 1, 1, 1]), grad_checkpointing=True
    )
    flags = [m.grad_checkpointing for m in task.modules() if isinstance(getattr(m, "grad_checkpointing", None), bool)]
    assert flags and all(flags)
