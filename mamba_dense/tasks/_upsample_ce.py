"""Cross-entropy of bilinearly upsampled logits without the full-resolution logits.

Segmentation heads predict at 1/4 (UPerNet) or 1/8 (FCN) of the input; the loss is taken after a
bilinear resize to the label size (mmseg: ``resize(seg_logits, size=label.shape[2:], mode="bilinear",
align_corners=False)`` then ``F.cross_entropy``). Done literally, a 512 x 512 batch of 16 with 150
classes materialises 629M logits per head in fp32 (autocast runs ``upsample_bilinear2d`` in fp32),
its softmax, and the upsample's backward: on an H100 that was ~100 ms of a 224 ms UPerNet step and
~5 GiB of memory (benchmarks/RESULTS.md).

``upsampled_cross_entropy`` gives the same value and gradient and never forms those tensors:

- forward (Triton): each full-resolution pixel interpolates its logits from the 4 low-resolution
  neighbours in fp32 (PyTorch's ``upsample_bilinear2d`` formula, ``align_corners=False``); one
  program per (pixel block, class block) writes the block's max, sum of exponentials and target
  logit, combined per pixel into the log-sum-exp in a fixed order. The mean is a plain ``sum()``
  of the per-pixel losses: deterministic.
- backward: per sample, a Triton kernel writes ``softmax - onehot`` at full resolution (in the
  logits' dtype, one sample alive at a time), and the transposed interpolation is two matrix
  products with the (out x in) interpolation matrices, ``Ry^T @ G @ Rx`` (deterministic, tensor
  cores), scaled by ``grad / count`` in fp32 at the end (no fp16 underflow of the tiny per-pixel
  gradient).

CPU tensors take the PyTorch path (``F.interpolate`` + ``cross_entropy``) unless ``impl="triton"``
(tests run the kernels in Triton's interpreter).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mamba_dense.kernels._launch import launch
from mamba_dense.kernels.triton_scan import on_device
from mamba_dense.layers.resize import bilinear_matrix

from ._losses import cross_entropy


@triton.jit
def _source(i, scale, n_in):
    # PyTorch's area_pixel_compute_source_index (align_corners=False, not cubic) + the +1 neighbour
    s = tl.maximum((i.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = s.to(tl.int32)  # s >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, n_in - 1)
    lam = s - i0.to(tl.float32)
    return i0, i1, lam


@triton.jit
def _interp_block(base, c, cm, pm, o00, o01, o10, o11, y0l, y1l, x0l, x1l, s_c):
    m2 = pm[:, None] & cm[None, :]
    co = c[None, :].to(tl.int64) * s_c
    v00 = tl.load(base + o00[:, None] + co, mask=m2, other=0.0).to(tl.float32)
    v01 = tl.load(base + o01[:, None] + co, mask=m2, other=0.0).to(tl.float32)
    v10 = tl.load(base + o10[:, None] + co, mask=m2, other=0.0).to(tl.float32)
    v11 = tl.load(base + o11[:, None] + co, mask=m2, other=0.0).to(tl.float32)
    top = x0l[:, None] * v00 + x1l[:, None] * v01
    bot = x0l[:, None] * v10 + x1l[:, None] * v11
    return y0l[:, None] * top + y1l[:, None] * bot


@triton.jit
def _pixel_setup(p, Wc, h, w, sh, sw, s_h, s_w):
    y = p // Wc
    x = p - y * Wc
    y0, y1, ly = _source(y, sh, h)
    x0, x1, lx = _source(x, sw, w)
    o00 = y0.to(tl.int64) * s_h + x0.to(tl.int64) * s_w
    o01 = y0.to(tl.int64) * s_h + x1.to(tl.int64) * s_w
    o10 = y1.to(tl.int64) * s_h + x0.to(tl.int64) * s_w
    o11 = y1.to(tl.int64) * s_h + x1.to(tl.int64) * s_w
    return o00, o01, o10, o11, 1.0 - ly, ly, 1.0 - lx, lx


@triton.jit
def _upce_fwd_kernel(L_ptr, T_ptr, m_ptr, s_ptr, zt_ptr, C, h, w, Wc, P, sh, sw, s_b, s_c, s_h, s_w,
                     ignore_index, BP: tl.constexpr, BC: tl.constexpr):
    # one class block of one pixel block: its max, sum of exp(z - max) and target logit (0 when the
    # target is in another block); the partials (B, n_blocks, P) are combined in forward() by a
    # logsumexp over the blocks in a fixed order
    b = tl.program_id(2).to(tl.int64)
    cb = tl.program_id(1)
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = cb * BC + tl.arange(0, BC)
    pm = p < P
    cm = c < C
    o00, o01, o10, o11, y0l, y1l, x0l, x1l = _pixel_setup(p, Wc, h, w, sh, sw, s_h, s_w)
    t = tl.load(T_ptr + b * P + p, mask=pm, other=ignore_index)
    z = _interp_block(L_ptr + b * s_b, c, cm, pm, o00, o01, o10, o11, y0l, y1l, x0l, x1l, s_c)
    z = tl.where(cm[None, :], z, float("-inf"))
    m = tl.max(z, axis=1)
    s = tl.sum(tl.exp(z - m[:, None]), axis=1)
    zt = tl.sum(tl.where(c[None, :] == t[:, None], z, 0.0), axis=1)
    off = (b * tl.num_programs(1) + cb) * P + p
    tl.store(m_ptr + off, m, mask=pm)
    tl.store(s_ptr + off, s, mask=pm)
    tl.store(zt_ptr + off, zt, mask=pm)


@triton.jit
def _upce_grad_kernel(L_ptr, T_ptr, lse_ptr, G_ptr, C, h, w, Wc, P, sh, sw, s_c, s_h, s_w, ignore_index,
                      BP: tl.constexpr, BC: tl.constexpr):
    # one sample: G (C, P) = (softmax - onehot) at valid pixels, 0 at ignored ones
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    pm = p < P
    cm = c < C
    o00, o01, o10, o11, y0l, y1l, x0l, x1l = _pixel_setup(p, Wc, h, w, sh, sw, s_h, s_w)
    t = tl.load(T_ptr + p, mask=pm, other=ignore_index)
    lse = tl.load(lse_ptr + p, mask=pm, other=0.0)
    z = _interp_block(L_ptr, c, cm, pm, o00, o01, o10, o11, y0l, y1l, x0l, x1l, s_c)
    g = tl.exp(z - lse[:, None]) - tl.where(c[None, :] == t[:, None], 1.0, 0.0)
    g = tl.where((t != ignore_index)[:, None], g, 0.0)
    m2 = pm[:, None] & cm[None, :]
    tl.store(G_ptr + c[None, :].to(tl.int64) * P + p[:, None], g.to(G_ptr.dtype.element_ty), mask=m2)


# (pixels per program, classes per block, warps) of the forward and the gradient kernel (the class
# block is capped by the classes). Chosen with benchmarks/loss.py on an H100 (RESULTS.md): for
# 16 x 150 classes at 512 x 512 the forward takes 3.9 ms, the backward ~3.6 ms. A forward that loops
# over the class blocks in one program (one online logsumexp, no partials) took 10-17 ms.
CONFIG = {"fwd": (128, 32, 4), "grad": (64, 32, 4)}


def _block_sizes(C: int, which: str) -> tuple[int, int, int]:
    bp, bc, warps = CONFIG[which]
    return bp, min(bc, triton.next_power_of_2(C)), warps


class _UpsampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, out_size, ignore_index, avg_non_ignore=True):
        B, C, h, w = logits.shape
        Hc, Wc = target.shape[-2:]
        P = Hc * Wc
        target = target.contiguous()
        sh, sw = h / out_size[0], w / out_size[1]
        BP, BC, warps = _block_sizes(C, "fwd")
        nb = triton.cdiv(C, BC)
        m, s, zt = (torch.empty(B, nb, P, device=logits.device, dtype=torch.float32) for _ in range(3))
        with on_device(logits):
            launch(_upce_fwd_kernel, (triton.cdiv(P, BP), nb, B),
                logits, target, m, s, zt, C, h, w, Wc, P, sh, sw, *logits.stride(), ignore_index, BP=BP, BC=BC,
                num_warps=warps,
            )
        mx = m.amax(1, keepdim=True)
        lse = (mx + (s * torch.exp(m - mx)).sum(1, keepdim=True).log()).squeeze(1)  # (B, P)
        valid = target.view(B, P) != ignore_index
        loss = torch.where(valid, lse - zt.sum(1), 0.0)
        count = valid.sum() if avg_non_ignore else valid.new_tensor(valid.numel(), dtype=torch.long)
        ctx.save_for_backward(logits, target, lse, count)
        ctx.args = (out_size, ignore_index, sh, sw)
        return loss.sum() / count  # 0 / 0 = NaN when every pixel is ignored, as F.cross_entropy's

    @staticmethod
    def backward(ctx, grad):
        logits, target, lse, count = ctx.saved_tensors
        out_size, ignore_index, sh, sw = ctx.args
        B, C, h, w = logits.shape
        Hc, Wc = target.shape[-2:]
        P = Hc * Wc
        gdt = logits.dtype
        ry = None if (h, Hc) == (out_size[0],) * 2 else bilinear_matrix(out_size[0], h, Hc, gdt, logits.device)
        rx = None if (w, Wc) == (out_size[1],) * 2 else bilinear_matrix(out_size[1], w, Wc, gdt, logits.device)
        BP, BC, warps = _block_sizes(C, "grad")
        scale = grad.float() / count
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        G = torch.empty(C, Hc, Wc, device=logits.device, dtype=gdt)
        with on_device(logits):
            for i in range(B):
                launch(_upce_grad_kernel, (triton.cdiv(P, BP), triton.cdiv(C, BC)),
                    logits[i], target[i], lse[i], G, C, h, w, Wc, P, sh, sw, *logits.stride()[1:], ignore_index,
                    BP=BP, BC=BC, num_warps=warps,
                )
                gi = G if rx is None else G @ rx  # (C, Hc, w)
                gi = gi if ry is None else ry.transpose(0, 1) @ gi  # (C, h, w)
                out[i] = (gi.float() * scale).to(gdt)
        return out, None, None, None, None


def _use_triton(logits: torch.Tensor, impl: str) -> bool:
    if impl == "triton":
        return True
    if impl == "torch":
        return False
    if impl != "auto":
        raise ValueError(f"upsampled_cross_entropy: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    # fp64 (precision="64-true") keeps the literal path: the kernels compute in fp32
    return logits.is_cuda and logits.dtype != torch.float64 and os.environ.get("MAMBA_DENSE_FUSED_CE", "1") != "0"


@torch.compiler.disable
def upsampled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, out_size: tuple[int, int] | None = None,
                            ignore_index: int = -100, impl: str = "auto", check_target: bool = True,
                            avg_non_ignore: bool = True) -> torch.Tensor:
    """``cross_entropy(F.interpolate(logits, out_size, mode="bilinear", align_corners=False)[..., :H, :W],
    target, ignore_index)`` for (B, C, h, w) logits and a (B, H, W) target, without forming the
    resized logits (see the module docstring). ``out_size`` defaults to the target's size; a larger
    one resizes to it and keeps the top-left (H, W) (images padded to a size divisor).

    ``impl``: "auto" (Triton on CUDA tensors except fp64, unless MAMBA_DENSE_FUSED_CE=0), "triton",
    "torch". ``check_target``: raise on a label outside [0, C) that is not ``ignore_index`` (one device
    sync; callers that validated their masks already pass False). ``avg_non_ignore``: as in
    ``cross_entropy`` (False: divide by all pixels, mmseg's default).
    Under ``torch.compile`` this function runs eagerly (a graph break).
    """
    if logits.dim() != 4 or target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"upsampled_cross_entropy: logits (B, C, h, w) and target (B, H, W) expected, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    H, W = target.shape[-2:]
    out_size = (H, W) if out_size is None else (int(out_size[0]), int(out_size[1]))
    if out_size[0] < H or out_size[1] < W:
        raise ValueError(f"upsampled_cross_entropy: out_size {out_size} is smaller than the target's {(H, W)}")
    if check_target:
        bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
        if bool(bad.any()):
            raise ValueError(
                f"upsampled_cross_entropy: target holds label {int(target[bad][0])} outside [0, {logits.shape[1]}) "
                f"and != ignore_index={ignore_index}; check num_classes and ignore_index"
            )
    if not _use_triton(logits, impl) or target.numel() == 0:  # empty: the literal path's NaN, no 0-size grid
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return cross_entropy(logits[..., :H, :W], target, ignore_index=ignore_index, avg_non_ignore=avg_non_ignore)
    if logits.dtype == torch.float64:  # Triton's fp32 math would silently lose fp64 precision
        raise ValueError("upsampled_cross_entropy: the Triton path computes in fp32; use impl='torch' for fp64")
    with torch.autocast(logits.device.type, enabled=False):
        return _UpsampledCrossEntropy.apply(logits, target.long(), out_size, int(ignore_index), bool(avg_non_ignore))
