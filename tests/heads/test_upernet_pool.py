"""UPerNet's PSP pooling: the matrix-product adaptive average pool equals PyTorch's, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.heads.upernet import AdaptiveAvgPool2d


@pytest.mark.parametrize("hw", [(7, 7), (16, 16), (5, 13), (1, 1), (2, 9), (33, 17)])
@pytest.mark.parametrize("s", [1, 2, 3, 6])
def test_matches_torch_adaptive_avg_pool(hw, s):
    x = torch.randn(2, 3, *hw, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = AdaptiveAvgPool2d(s)(x), F.adaptive_avg_pool2d(x2, s)
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)


def test_pool_built_in_inference_mode_still_trains():
    pool = AdaptiveAvgPool2d(3)
    with torch.inference_mode():
        pool(torch.randn(1, 2, 11, 11))
    x = torch.randn(1, 2, 11, 11, requires_grad=True)
    pool(x).sum().backward()
    assert torch.isfinite(x.grad).all()
