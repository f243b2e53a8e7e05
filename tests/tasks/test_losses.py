"""The task's cross-entropy: values and gradients equal F.cross_entropy's (mean over non-ignored
elements), for 2D and 3D logits, low-precision logits, and the all-ignored case."""

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.tasks._losses import cross_entropy


@pytest.mark.parametrize("spatial", [(7, 9), (3, 4, 5)])
def test_matches_torch_cross_entropy_fp64(spatial):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 6, *spatial, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 6, (3, *spatial), generator=g)
    target[0].view(-1)[::3] = 255  # some ignored
    l2 = logits.detach().clone().requires_grad_()
    loss, ref = cross_entropy(logits, target, ignore_index=255), F.cross_entropy(l2, target, ignore_index=255)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    gl, gr = torch.autograd.grad(2.5 * loss, logits), torch.autograd.grad(2.5 * ref, l2)
    torch.testing.assert_close(gl[0], gr[0], rtol=1e-10, atol=1e-14)


def test_bf16_logits_under_autocast_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 8, 8, generator=g)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    lb = base.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(lb, target)
    loss.backward()
    lf = lb.detach().float().requires_grad_()
    ref = F.cross_entropy(lf, target)
    ref.backward()
    assert loss.dtype == torch.float32 and lb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lb.grad.float(), lf.grad, rtol=2e-2, atol=1e-4)


def test_all_ignored_is_nan_like_torch():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    assert torch.isnan(cross_entropy(logits, target, ignore_index=255))
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=255))


def test_bad_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and \(2, 5, 4\)"):
        cross_entropy(torch.randn(2, 3, 4, 4), torch.zeros(2, 5, 4, dtype=torch.long))


@pytest.mark.parametrize("spatial", [(7, 9), (3, 4, 5)])
def test_average_over_all_elements_as_mmseg(spatial):
    """avg_non_ignore=False: mmseg's CrossEntropyLoss default, the sum over non-ignored elements
    divided by all of them; 0 (not NaN) when every element is ignored."""
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(2, 4, *spatial, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 4, (2, *spatial), generator=g)
    target[1].view(-1)[::2] = 255
    l2 = logits.detach().clone().requires_grad_()
    loss = cross_entropy(logits, target, ignore_index=255, avg_non_ignore=False)
    ref = F.cross_entropy(l2, target, ignore_index=255, reduction="sum") / target.numel()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    gl, gr = torch.autograd.grad(1.3 * loss, logits), torch.autograd.grad(1.3 * ref, l2)
    torch.testing.assert_close(gl[0], gr[0], rtol=1e-10, atol=1e-14)
    ignored = torch.full_like(target, 255)
    loss = cross_entropy(logits, ignored, ignore_index=255, avg_non_ignore=False)
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
