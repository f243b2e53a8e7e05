"""resize_bilinear (matrix products) equals F.interpolate(bilinear, align_corners=False): values and
gradients, up and down, odd sizes, NCHW and channels_last (kept), under autocast; bilinear_matrix
with a crop."""

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.layers.resize import bilinear_matrix, resize_bilinear

SIZES = [((8, 8), (32, 32)), ((7, 9), (30, 37)), ((16, 12), (10, 7)), ((1, 3), (6, 6)), ((6, 6), (6, 13)), ((5, 4), (5, 4))]


@pytest.mark.parametrize("src,dst", SIZES, ids=[f"{a}->{b}" for a, b in SIZES])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_interpolate_fp32(src, dst, channels_last):
    g = torch.Generator().manual_seed(src[0] * 31 + dst[1])
    x = torch.randn(2, 5, *src, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, ref = resize_bilinear(xa, dst), F.interpolate(xb, size=dst, mode="bilinear", align_corners=False)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if channels_last and src != dst:
        assert got.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn(ref.shape, generator=g)
    (ga,), (gb,) = torch.autograd.grad(got, xa, dy), torch.autograd.grad(ref, xb, dy)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


def test_bf16_under_autocast_close_to_fp32_interpolate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    ref = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resize_bilinear(x, (64, 64))
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.parametrize("n_out,n_in,keep", [(32, 8, 32), (40, 9, 37), (7, 16, 7), (11, 11, 11), (5, 1, 5)])
def test_bilinear_matrix_rows_are_interpolate(n_out, n_in, keep):
    """(the fused loss's backward uses the cropped matrices) fp32 input: PyTorch's scale in / out is
    fp32, as the matrix's."""
    v = torch.randn(3, n_in, generator=torch.Generator().manual_seed(n_out))
    ref = F.interpolate(v[None], size=n_out, mode="linear", align_corners=False)[0, :, :keep]
    got = v.double() @ bilinear_matrix(n_out, n_in, keep, dtype=torch.float64).T
    torch.testing.assert_close(got, ref.double(), rtol=1e-6, atol=3e-6)  # fp32 rounding of ref


def test_matrices_first_built_in_inference_mode_still_train():
    """Lightning's validate / predict run under inference mode; a resize matrix cached there must not be
    an inference tensor, or the next training step at that size fails to save it for backward
    ("Inference tensors cannot be saved for backward": predict then fit in one process)."""
    from mamba_dense.layers.resize import resize_bilinear

    with torch.inference_mode():
        resize_bilinear(torch.randn(1, 2, 7, 9), (13, 11))  # first sight of these sizes
    x = torch.randn(1, 2, 7, 9, requires_grad=True)
    resize_bilinear(x, (13, 11)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fp64_under_autocast_stays_fp64():
    """Autocast leaves fp64 alone; the matrices were built in the autocast dtype (a matmul dtype error)."""
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = resize_bilinear(x, (9, 4))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.interpolate(x, (9, 4), mode="bilinear", align_corners=False), rtol=1e-5, atol=1e-6)
