"""upsampled_cross_entropy: the fused bilinear-resize + cross-entropy (Triton kernels; on CPU they
run in Triton's interpreter) against F.interpolate + F.cross_entropy in fp64, value and gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.tasks import _upsample_ce
from mamba_dense.tasks._upsample_ce import upsampled_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(logits, target, out_size, ignore_index):
    """fp64 F.interpolate (align_corners=False) + crop + F.cross_entropy; loss and d loss / d logits."""
    l64 = logits.detach().cpu().double().requires_grad_()
    H, W = target.shape[-2:]
    up = F.interpolate(l64, size=out_size, mode="bilinear", align_corners=False)[..., :H, :W]
    loss = F.cross_entropy(up, target.cpu(), ignore_index=ignore_index)
    (g,) = torch.autograd.grad(1.7 * loss, l64)
    return loss.detach(), g


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# (B, C, h, w, out (H, W) of the resize, target (H, W)): x4 as UPerNet, x8 as the FCN aux head,
# odd sizes and a crop (images padded to a size divisor), the identity, more classes than a block
CASES = {
    "x4": (2, 6, 8, 8, (32, 32), (32, 32)),
    "x8-70cls": (1, 70, 4, 5, (32, 40), (32, 40)),
    "odd-crop": (2, 5, 7, 9, (32, 40), (30, 37)),
    "identity": (2, 4, 9, 11, (9, 11), (9, 11)),
    "down": (1, 3, 16, 12, (10, 7), (10, 7)),
}


# every case in fp32 and bf16 in NCHW; channels_last (the heads' layout under autocast) on some
RUNS = [(n, d, False) for n in CASES for d in (torch.float32, torch.bfloat16)] + [
    ("x4", torch.bfloat16, True), ("odd-crop", torch.float32, True), ("x8-70cls", torch.bfloat16, True),
    ("x4", torch.float16, True), ("odd-crop", torch.float16, False),  # 16-mixed: fp16 logits and gradient
]


@pytest.mark.parametrize(
    "name,dtype,channels_last", RUNS, ids=[f"{n}-{str(d)[6:]}" + ("-nhwc" if cl else "") for n, d, cl in RUNS],
)
def test_matches_interpolate_then_cross_entropy(name, dtype, channels_last, monkeypatch):
    # small class blocks: several blocks (and a partial last one) at C >= 5, in both kernels
    monkeypatch.setitem(_upsample_ce.CONFIG, "fwd", (64, 4, 1))
    monkeypatch.setitem(_upsample_ce.CONFIG, "grad", (64, 4, 1))
    B, C, h, w, out_size, tsize = CASES[name]
    g = torch.Generator().manual_seed(hash(name) % 1000)
    base = 3 * torch.randn(B, C, h, w, generator=g)  # never zeros
    target = torch.randint(0, C, (B, *tsize), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    logits = base.to(DEVICE, dtype)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    logits.requires_grad_()
    loss = upsampled_cross_entropy(logits, target.to(DEVICE), out_size, ignore_index=255, impl="triton")
    (grad,) = torch.autograd.grad(1.7 * loss, logits)
    ref_loss, ref_grad = _reference(logits, target, out_size, 255)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert torch.isfinite(grad).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 / fp16
    assert abs(float(loss.detach()) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))  # fp32 math on the given logits
    assert _rel(grad, ref_grad) < tol


def test_torch_path_is_the_literal_composition():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (2, 30, 37), generator=g)
    loss = upsampled_cross_entropy(logits, target, (32, 40), ignore_index=255, impl="torch")
    ref_loss, ref_grad = _reference(logits, target, (32, 40), 255)
    (grad,) = torch.autograd.grad(1.7 * loss, logits)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_empty_batch_is_nan_like_torch():
    logits = torch.randn(0, 3, 4, 4, device=DEVICE, requires_grad=True)
    loss = upsampled_cross_entropy(logits, torch.zeros(0, 16, 16, dtype=torch.long, device=DEVICE), impl="triton")
    assert math.isnan(float(loss.detach()))


def test_all_ignored_is_nan_like_torch():
    logits = torch.randn(1, 3, 4, 4, device=DEVICE, requires_grad=True)
    target = torch.full((1, 16, 16), 255, device=DEVICE)
    loss = upsampled_cross_entropy(logits, target, ignore_index=255, impl="triton")
    assert math.isnan(float(loss.detach()))
    assert math.isnan(float(F.cross_entropy(F.interpolate(logits, size=(16, 16), mode="bilinear"), target, ignore_index=255)))


def test_bad_input_errors_name_the_problem():
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"logits \(B, C, h, w\) and target \(B, H, W\)"):
        upsampled_cross_entropy(logits, torch.zeros(2, 1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="smaller than the target"):
        upsampled_cross_entropy(logits, torch.zeros(2, 16, 16, dtype=torch.long), out_size=(8, 8))
    with pytest.raises(ValueError, match="impl"):
        upsampled_cross_entropy(logits, torch.zeros(2, 16, 16, dtype=torch.long), impl="cuda")
    with pytest.raises(ValueError, match=r"label 7 outside \[0, 3\) and != ignore_index=255"):
        upsampled_cross_entropy(logits, torch.full((2, 16, 16), 7), ignore_index=255)
    with pytest.raises(ValueError, match="fp64"):
        upsampled_cross_entropy(logits.double(), torch.zeros(2, 16, 16, dtype=torch.long), impl="triton")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_average_over_all_pixels_as_mmseg(impl):
    """avg_non_ignore=False (mmseg's default): the summed loss over all label pixels, ignored ones
    counting 0; an all-ignored batch gives 0 and a zero gradient."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float32).to(DEVICE).requires_grad_()
    target = torch.randint(0, 5, (2, 30, 37), generator=g)
    target[0, :11] = 255
    target = target.to(DEVICE)
    loss = upsampled_cross_entropy(logits, target, (32, 40), ignore_index=255, impl=impl, avg_non_ignore=False)
    (grad,) = torch.autograd.grad(1.7 * loss, logits)
    ref_loss, ref_grad = _reference(logits, target, (32, 40), 255)
    valid = float((target != 255).sum()) / target.numel()  # the reference averages over valid pixels
    assert abs(float(loss) - float(ref_loss) * valid) < 1e-5 * float(ref_loss)
    assert _rel(grad, ref_grad * valid) < 1e-5
    ignored = torch.full_like(target, 255)
    loss = upsampled_cross_entropy(logits, ignored, (32, 40), ignore_index=255, impl=impl, avg_non_ignore=False)
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(loss) == 0.0 and not grad.any()
