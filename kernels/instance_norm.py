"""Fused instance norm + activation for (B, C, *spatial) volumes: Triton forward and backward.

``instance_norm_act`` computes, per (b, c) row of S spatial elements,

    y = act((x - mean) * rstd * weight[c] + bias[c]),    rstd = 1 / sqrt(var + eps)

with the mean and biased variance of the row: ``torch.group_norm(x, C, weight, bias, eps)`` (one
group per channel; one element per channel is allowed) followed by ReLU / LeakyReLU, in one op.
x is fp16, bf16 or fp32 (fp64 too); y has x's dtype and memory format; statistics are fp32 (fp64
for fp64 inputs).

Why: PyTorch's group_norm kernel runs one block per row, so a (2, 32, 128^3) volume gets 64 blocks
of 2M elements, a fraction of an H100, and under bf16 autocast it runs in fp32 between cast copies.
Here every reduction is split over enough programs to fill the GPU.

Layout: the kernels see x as (B, S, C) and work on 2D tiles [BLOCK_S, BLOCK_C] of one batch item.
A contiguous x (NC...: a row is contiguous) gets tiles long along S (and several channels when S is
small); a channels-last x (N...C: a row is strided by C) gets tiles of up to MAX_BLOCK_C channels,
so that loads coalesce along C either way. Any other layout is made contiguous first.

Forward, x read twice and y written once:
  1. split reduction, grid (B, n_split, channel blocks): each program walks its chunk of the
     spatial axis (a run of whole tiles), keeps Welford's running mean and M2 (sum of squared
     deviations) in every lane of its tile, and writes the chunk's mean and M2 per channel, merging
     the lanes with Chan's parallel formula (no cancellation of a sum of squares against a squared
     sum, whatever the mean). n_split gives the grid at least
     PROGRAMS_PER_SM programs per SM (when the spatial axis has enough tiles).
  2. finalize, one tiny kernel: merges the chunks of each row (exact parallel formula) -> mean, rstd.
  3. elementwise, grid (B, spatial tiles, channel blocks): y = act((x - mean) * rstd * w + b).
Backward, with g = dy * act'(pre) (pre recomputed from x, mean, rstd, weight and bias by the
forward's own expression: only its sign is needed, for ReLU and LeakyReLU) and
xhat = (x - mean) * rstd; x and dy read twice, dx written once (reading the output y for the sign
instead was a third stream, H100 session 10 in benchmarks/RESULTS.md):
  1. split reduction of sum(g) and sum(g * xhat) per (b, split, c); one tiny kernel sums them over
     the splits (the row means dx needs); summed over b with torch they give dbias and dweight.
  2. elementwise: dx = rstd * w * (g - mean(g) - xhat * mean(g * xhat)).
No atomics: results are deterministic. Offsets are int64 wherever they can pass 2^31.

CPU tensors take the PyTorch path (``torch.group_norm`` + activation) unless
``MAMBA_DENSE_TRITON_CPU=1``, which (with ``TRITON_INTERPRET=1``) runs the kernels in Triton's
interpreter, as the tests do.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _triton_on_cpu
from ._launch import launch
from .triton_scan import _empty, _num_sms, on_device

__all__ = ["instance_norm_act"]

_ACTS = {"none": 0, "relu": 1, "leaky_relu": 2}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

TILE = 4096  # elements per tile
MAX_BLOCK_C = 64  # channels per tile of a channels-last x
PROGRAMS_PER_SM = 8  # the split reductions aim for at least this many programs per SM
BLOCK_R = 16  # rows per program of the finalize kernel
BLOCK_SPLIT = 64  # chunks per load of the finalize kernel

# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _decode(pid, n_mid, n_cblk):
    """Program id -> (batch, spatial split or tile, channel block); channel blocks vary fastest."""
    cb = pid % n_cblk
    t = pid // n_cblk
    return t // n_mid, t % n_mid, cb


@triton.jit
def _tile(b, s0, c0, C, S, CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (int64 start + int32 in-tile) and mask of the tile at (b, s0, c0) of x seen as (B, S, C)."""
    s = tl.arange(0, BLOCK_S)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    if CL:
        start = (b.to(tl.int64) * S + s0) * C + c0
        local = s * C + c
    else:
        start = (b.to(tl.int64) * C + c0) * S + s0
        local = c * S + s  # BLOCK_C > 1 only when S < BLOCK_S: fits in int32
    return start + local, (s0 + s < S) & (c0 + c < C)


@triton.jit
def _act(v, SLOPE: tl.constexpr, ACT: tl.constexpr):
    # written so that NaN propagates, as in torch
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0, v * SLOPE, v)
    return v


@triton.jit
def _affine(c, cmask, rstd, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, CT: tl.constexpr):
    """(scale, shift) of channels c: pre = (x - mean) * scale + shift, as the forward computes it."""
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=0.0).to(CT)
    shift = tl.zeros(rstd.shape, CT)
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(CT)
    return scale, shift


@triton.jit
def _act_grad(dy_ptr, off, mask, pre, SLOPE: tl.constexpr, ACT: tl.constexpr, CT: tl.constexpr):
    """g = dy * act'(pre), with pre recomputed from x by the forward's own expression (the sign of
    the output y; reading y instead cost a third input stream in both backward kernels)."""
    g = tl.load(dy_ptr + off, mask=mask, other=0.0).to(CT)
    if ACT != 0:
        pos = pre > 0
        if ACT == 1:
            g = tl.where(pos, g, 0.0)
        else:
            g = tl.where(pos, g, g * SLOPE)
    return g


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _stats_kernel(x_ptr, part_ptr, B, C, S, n_split, n_cblk, tiles_per_split,
                  CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr):
    """Forward phase 1: (mean, M2) per channel of one chunk -> part (2, B, n_split, C).

    Welford's update in every lane of the tile (no reduction inside the loop, so the next tile's
    load need not wait for one), then the lanes merged with Chan's formula. A merge of every tile
    into per-channel statistics (a cross-warp reduction per tile) ran the 43 norms of a segmamba_tiny
    step in 2.54 ms on the H100 against 1.46 ms for the normalization pass, which also writes y.
    """
    b, split, cb = _decode(tl.program_id(0), n_split, n_cblk)
    c0 = cb * BLOCK_C
    s_lo = split * tiles_per_split * BLOCK_S
    s_hi = tl.minimum(s_lo + tiles_per_split * BLOCK_S, S)
    cnt = tl.zeros([BLOCK_S, BLOCK_C], CT)
    mean = tl.zeros([BLOCK_S, BLOCK_C], CT)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], CT)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        off, mask = _tile(b, s0, c0, C, S, CL, BLOCK_S, BLOCK_C)
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(CT)
        # a lane is valid in every tile of the chunk but perhaps the last: its count is the tile's
        # index + 1, the same for all valid lanes
        r = 1.0 / ((s0 - s_lo) // BLOCK_S + 1).to(CT)
        delta = v - mean
        mean = tl.where(mask, mean + delta * r, mean)
        m2 = tl.where(mask, m2 + delta * (v - mean), m2)
        cnt += mask.to(CT)
    n_c = tl.sum(cnt, axis=0)
    mean_c = tl.sum(cnt * mean, axis=0) / tl.maximum(n_c, 1.0)
    d = mean - mean_c[None, :]
    m2_c = tl.sum(m2 + cnt * d * d, axis=0)
    c = c0 + tl.arange(0, BLOCK_C)
    out = (b * n_split + split) * C + c
    tl.store(part_ptr + out, mean_c, mask=c < C)
    tl.store(part_ptr + B * n_split * C + out, m2_c, mask=c < C)


@triton.jit
def _finalize_kernel(part_ptr, mean_ptr, rstd_ptr, B, C, S, n_split, chunk,
                     EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SPLIT: tl.constexpr, CT: tl.constexpr):
    """Forward phase 2: merge the chunks of BLOCK_R rows -> mean, rstd (B * C,).

    Exact parallel formula in two passes over the chunks (mean = sum n_i mean_i / S, then
    M2 = sum M2_i + n_i (mean_i - mean)^2), BLOCK_SPLIT chunks per load: channels-last maps get
    hundreds of chunks per row, which a chunk-at-a-time loop walked as a chain of dependent loads
    (H100: 4.4 ms over the 43 norms of a compiled segmamba_tiny step).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < B * C
    p = (r // C) * n_split * C + r % C  # chunk 0 of row r in part
    m2_ptr = part_ptr + B * n_split * C
    j = tl.arange(0, BLOCK_SPLIT)
    tot = tl.zeros([BLOCK_R], CT)
    for i0 in range(0, n_split, BLOCK_SPLIT):
        i = i0 + j
        m = rmask[:, None] & (i < n_split)[None, :]
        cnt = tl.maximum(tl.minimum(chunk, S - i * chunk), 0).to(CT)
        v = tl.load(part_ptr + p[:, None] + i[None, :] * C, mask=m, other=0.0)
        tot += tl.sum(cnt[None, :] * v, axis=1)
    mean = tot / S
    m2 = tl.zeros([BLOCK_R], CT)
    for i0 in range(0, n_split, BLOCK_SPLIT):
        i = i0 + j
        m = rmask[:, None] & (i < n_split)[None, :]
        cnt = tl.maximum(tl.minimum(chunk, S - i * chunk), 0).to(CT)
        off = p[:, None] + i[None, :] * C
        d = tl.where(m, tl.load(part_ptr + off, mask=m, other=0.0) - mean[:, None], 0.0)
        m2 += tl.sum(tl.load(m2_ptr + off, mask=m, other=0.0) + cnt[None, :] * d * d, axis=1)
    tl.store(mean_ptr + r, mean, mask=rmask)
    tl.store(rstd_ptr + r, 1.0 / tl.sqrt(m2 / S + EPS), mask=rmask)


@triton.jit
def _norm_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, C, S, n_stile, n_cblk, SLOPE: tl.constexpr,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr):
    """Forward phase 3: y = act((x - mean) * rstd * w + b) on one tile."""
    b, st, cb = _decode(tl.program_id(0), n_stile, n_cblk)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(mean_ptr + b * C + c, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + b * C + c, mask=cmask, other=0.0)
    scale, shift = _affine(c, cmask, rstd, w_ptr, b_ptr, HAS_W, HAS_B, CT)
    off, mask = _tile(b, st * BLOCK_S, cb * BLOCK_C, C, S, CL, BLOCK_S, BLOCK_C)
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(CT)
    y = _act((v - mean[None, :]) * scale[None, :] + shift[None, :], SLOPE, ACT)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_stats_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, B, C, S, n_split, n_cblk,
                      tiles_per_split, SLOPE: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                      CT: tl.constexpr):
    """Backward phase 1: sum(g) and sum(g * xhat) per channel of one chunk -> part (2, B, n_split, C)."""
    b, split, cb = _decode(tl.program_id(0), n_split, n_cblk)
    c0 = cb * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(mean_ptr + b * C + c, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + b * C + c, mask=cmask, other=0.0)
    scale, shift = _affine(c, cmask, rstd, w_ptr, b_ptr, HAS_W, HAS_B, CT)
    s_lo = split * tiles_per_split * BLOCK_S
    s_hi = tl.minimum(s_lo + tiles_per_split * BLOCK_S, S)
    acc_g = tl.zeros([BLOCK_S, BLOCK_C], CT)
    acc_gx = tl.zeros([BLOCK_S, BLOCK_C], CT)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        off, mask = _tile(b, s0, c0, C, S, CL, BLOCK_S, BLOCK_C)
        xc = tl.load(x_ptr + off, mask=mask, other=0.0).to(CT) - mean[None, :]
        g = _act_grad(dy_ptr, off, mask, xc * scale[None, :] + shift[None, :], SLOPE, ACT, CT)  # 0 outside the mask
        xhat = xc * rstd[None, :]
        acc_g += g
        acc_gx += g * xhat
    out = (b * n_split + split) * C + c
    tl.store(part_ptr + out, tl.sum(acc_g, axis=0), mask=cmask)
    tl.store(part_ptr + B * n_split * C + out, tl.sum(acc_gx, axis=0), mask=cmask)


@triton.jit
def _bwd_sums_kernel(part_ptr, sums_ptr, n_rows, n_split, C, BLOCK_R: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
                     CT: tl.constexpr):
    """Backward phase 1b: the chunks' partial sums part (2, B, n_split, C) added per row -> sums
    (2, B, C), BLOCK_R rows per program, BLOCK_SPLIT chunks per load, in a fixed order."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    p = (r // C) * n_split * C + r % C  # chunk 0 of row r in part
    j = tl.arange(0, BLOCK_SPLIT)
    acc = tl.zeros([BLOCK_R], CT)
    for i0 in range(0, n_split, BLOCK_SPLIT):
        i = i0 + j
        m = rmask[:, None] & (i < n_split)[None, :]
        acc += tl.sum(tl.load(part_ptr + p[:, None] + i[None, :] * C, mask=m, other=0.0), axis=1)
    tl.store(sums_ptr + r, acc, mask=rmask)


@triton.jit
def _bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sums_ptr, B, C, S,
                   n_stile, n_cblk, SLOPE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ACT: tl.constexpr,
                   CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr):
    """Backward phase 2: dx = rstd * w * (g - mean(g) - xhat * mean(g * xhat)) on one tile."""
    b, st, cb = _decode(tl.program_id(0), n_stile, n_cblk)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    row = b * C + c
    mean = tl.load(mean_ptr + row, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + row, mask=cmask, other=0.0)
    scale, shift = _affine(c, cmask, rstd, w_ptr, b_ptr, HAS_W, HAS_B, CT)
    mean_g = tl.load(sums_ptr + row, mask=cmask, other=0.0) / S
    mean_gx = tl.load(sums_ptr + B * C + row, mask=cmask, other=0.0) / S
    off, mask = _tile(b, st * BLOCK_S, cb * BLOCK_C, C, S, CL, BLOCK_S, BLOCK_C)
    xc = tl.load(x_ptr + off, mask=mask, other=0.0).to(CT) - mean[None, :]
    g = _act_grad(dy_ptr, off, mask, xc * scale[None, :] + shift[None, :], SLOPE, ACT, CT)
    xhat = xc * rstd[None, :]
    dx = scale[None, :] * (g - mean_g[None, :] - xhat * mean_gx[None, :])
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """Tiling of x seen as (B, S, C), shared by all kernels of one call."""

    B: int
    C: int
    S: int
    cl: bool  # channels-last
    block_s: int
    block_c: int
    n_stile: int  # tiles along S
    n_cblk: int  # tiles along C
    tiles_per_split: int  # tiles along S per program of the split reductions
    n_split: int
    num_warps: int


def _plan(x: torch.Tensor, cl: bool) -> _Plan:
    """Tiles of at most TILE elements, contiguous along x's contiguous axis; splits to fill the GPU."""
    B, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if cl:
        block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
        block_s = min(triton.next_power_of_2(S), max(1, TILE // block_c))
    else:
        block_s = min(triton.next_power_of_2(S), TILE)
        block_c = min(triton.next_power_of_2(C), max(1, TILE // block_s))
    n_stile, n_cblk = triton.cdiv(S, block_s), triton.cdiv(C, block_c)
    want = triton.cdiv(PROGRAMS_PER_SM * _num_sms(x.device), B * n_cblk)  # splits per (b, channel block)
    tiles_per_split = triton.cdiv(n_stile, min(want, n_stile))
    num_warps = max(1, min(8, block_s * block_c // 256))
    return _Plan(B, C, S, cl, block_s, block_c, n_stile, n_cblk, tiles_per_split,
                 triton.cdiv(n_stile, tiles_per_split), num_warps)


def _meta(p: _Plan, dtype: torch.dtype) -> dict:
    ct = tl.float64 if dtype == torch.float64 else tl.float32
    return dict(CL=p.cl, BLOCK_S=p.block_s, BLOCK_C=p.block_c, CT=ct, num_warps=p.num_warps)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_cl(x: torch.Tensor) -> bool:
    """Whether the kernels read x as channels-last: not contiguous, but contiguous with C last."""
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x as the kernels read it, whether it is channels-last); any other layout is made contiguous."""
    if _is_cl(x):
        return x, True
    return x.contiguous(), False


def _empty_as(x: torch.Tensor, cl: bool) -> torch.Tensor:
    """An uninitialised tensor of x's shape, dtype and layout (NaN under MAMBA_DENSE_POISON=1)."""
    if cl:
        return _empty(x.shape[0], *x.shape[2:], x.shape[1], device=x.device, dtype=x.dtype).movedim(-1, 1)
    return _empty(*x.shape, device=x.device, dtype=x.dtype)


def _forward(x, p, weight, bias, eps, act, slope):
    meta = _meta(p, x.dtype)
    sdt = _stat_dtype(x.dtype)
    part = _empty(2, p.B, p.n_split, p.C, device=x.device, dtype=sdt)
    launch(_stats_kernel, (p.B * p.n_split * p.n_cblk,),
        x, part, p.B, p.C, p.S, p.n_split, p.n_cblk, p.tiles_per_split, **meta)
    mean = _empty(p.B * p.C, device=x.device, dtype=sdt)
    rstd = _empty(p.B * p.C, device=x.device, dtype=sdt)
    launch(_finalize_kernel, (triton.cdiv(p.B * p.C, BLOCK_R),),
        part, mean, rstd, p.B, p.C, p.S, p.n_split, p.tiles_per_split * p.block_s,
        EPS=eps, BLOCK_R=BLOCK_R, BLOCK_SPLIT=BLOCK_SPLIT, CT=meta["CT"])
    y = _empty_as(x, p.cl)
    launch(_norm_kernel, (p.B * p.n_stile * p.n_cblk,),
        x, y, mean, rstd, mean if weight is None else weight, mean if bias is None else bias,
        p.C, p.S, p.n_stile, p.n_cblk, SLOPE=slope,
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=_ACTS[act], **meta)
    return y, mean, rstd


def _backward(dy, x, p, weight, bias, mean, rstd, act, slope, need_dx):
    """(dx or None, (2, C) [dbias, dweight]) with the forward's plan p; the parameter gradients in the
    statistics dtype."""
    meta = _meta(p, x.dtype)
    dy = dy.movedim(1, -1).contiguous() if p.cl else dy.contiguous()
    wb = dict(HAS_W=weight is not None, HAS_B=bias is not None)
    w_, b_ = (mean if weight is None else weight), (mean if bias is None else bias)
    part = _empty(2, p.B, p.n_split, p.C, device=x.device, dtype=mean.dtype)
    launch(_bwd_stats_kernel, (p.B * p.n_split * p.n_cblk,),
        x, dy, w_, b_, mean, rstd, part, p.B, p.C, p.S, p.n_split, p.n_cblk, p.tiles_per_split,
        SLOPE=slope, ACT=_ACTS[act], **wb, **meta)
    sums = _empty(2, p.B, p.C, device=x.device, dtype=mean.dtype)  # sum(g), sum(g * xhat) per row
    launch(_bwd_sums_kernel, (triton.cdiv(2 * p.B * p.C, BLOCK_R),),
        part, sums, 2 * p.B * p.C, p.n_split, p.C, BLOCK_R=BLOCK_R, BLOCK_SPLIT=BLOCK_SPLIT, CT=meta["CT"])
    dx = None
    if need_dx:
        dx = _empty_as(x, p.cl)
        launch(_bwd_dx_kernel, (p.B * p.n_stile * p.n_cblk,),
            x, dy, dx, mean, rstd, w_, b_, sums, p.B, p.C, p.S,
            p.n_stile, p.n_cblk, SLOPE=slope, ACT=_ACTS[act], **wb, **meta)
    return dx, sums.sum(1)


# The Triton path is registered as two custom ops (``mamba_dense::instance_norm_fwd`` / ``_bwd``)
# tied by ``register_autograd``: opaque to ``torch.compile`` (no graph break, so a whole 3D model
# compiles into one graph and ``mode="reduce-overhead"`` can replay it as a CUDA graph), with fake
# implementations for tracing. (Dynamo tracing into the launches, the alternative, failed in
# Inductor on the H100 with torch 2.11 / triton 3.6: "loop-carried variable acc_g ... fp32 ...
# re-assigned to fp64" in the backward statistics kernel.)


def _like_layout(x: torch.Tensor, cl: bool) -> torch.Tensor:
    """torch.empty of x's shape and dtype in the layout the kernels write (fake implementations)."""
    if cl:
        return x.new_empty((x.shape[0], *x.shape[2:], x.shape[1])).movedim(-1, 1)
    return x.new_empty(x.shape)


@torch.library.custom_op("mamba_dense::instance_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, act: str,
            slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); mean and rstd are (B * C,) in the statistics dtype."""
    x, cl = _layout(x)
    with on_device(x):
        return _forward(x, _plan(x, cl), weight, bias, eps, act, slope)


@_fwd_op.register_fake
def _(x, weight, bias, eps, act, slope):
    n = x.shape[0] * x.shape[1]
    sdt = _stat_dtype(x.dtype)
    return _like_layout(x, _is_cl(x)), x.new_empty((n,), dtype=sdt), x.new_empty((n,), dtype=sdt)


@torch.library.custom_op("mamba_dense::instance_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
            rstd: torch.Tensor, bias: Optional[torch.Tensor], act: str, slope: float,
            need_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, (2, C) [dbias, dweight] in the statistics dtype); dx is empty when not needed."""
    x, cl = _layout(x)
    with on_device(x):
        dx, dbw = _backward(dy, x, _plan(x, cl), weight, bias, mean, rstd, act, slope, need_dx)
    return (dx if dx is not None else x.new_empty((0,))), dbw


@_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, bias, act, slope, need_dx):
    dx = _like_layout(x, _is_cl(x)) if need_dx else x.new_empty((0,))
    return dx, mean.new_empty((2, x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, act, slope = inputs
    y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd, None if act == "none" else bias)
    ctx.act, ctx.slope = act, slope
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_rule(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd, bias = ctx.saved_tensors
    dx, (dbias, dweight) = _bwd_op(dy, x, weight, mean, rstd, bias, ctx.act, ctx.slope, ctx.needs_input_grad[0])
    dx = dx if ctx.needs_input_grad[0] else None
    dweight = dweight.to(weight.dtype) if ctx.needs_input_grad[1] else None
    dbias = dbias.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None, None, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def _use_triton(x: torch.Tensor) -> bool:
    """CUDA -> the Triton kernels; CPU -> the PyTorch path.

    On CUDA the kernels run at every size: at 32^3 and below their five launches cost more host time
    than PyTorch's group_norm (`benchmarks/instance_norm.py`, H100: forward + backward 1.0-1.4 against
    0.3-0.6 ms, host-bound), but inside the GPU-bound 3D models the bf16 I/O wins (segmamba_tiny step
    197.7 ms with the kernels everywhere, 201.0 ms with group_norm below 64^3).
    ``MAMBA_DENSE_TRITON_CPU=1`` together with ``TRITON_INTERPRET=1`` runs the Triton kernels on
    CPU tensors through Triton's interpreter (used by the tests).
    """
    return x.device.type in ("cuda", "meta") or _triton_on_cpu(x)  # meta: the op's fake (x's layout)


def _reference(x, weight, bias, eps, act, slope):
    """torch.group_norm with C groups + activation, computed in fp32 (fp64 for fp64), cast back."""
    cdt = _stat_dtype(x.dtype)
    cast = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    y = torch.group_norm(x.to(cdt), x.shape[1], cast(weight), cast(bias), eps)
    if act == "relu":
        y = F.relu(y)
    elif act == "leaky_relu":
        y = F.leaky_relu(y, slope)
    return y.to(x.dtype)


def _validate(x, weight, bias, act) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (B, C, *spatial) with at least one spatial dim, got {got}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x has unsupported dtype {x.dtype}; use float16, bfloat16, float32 or float64")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,) or t.dtype not in _FLOAT_DTYPES:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of shape (C,) = ({C},), got {got}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if act not in _ACTS:
        raise ValueError(f"act must be one of {list(_ACTS)}, got {act!r}")


def instance_norm_act(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      eps: float = 1e-5, act: str = "none", negative_slope: float = 0.01) -> torch.Tensor:
    """Instance norm (+ affine, + activation) of a (B, C, *spatial) tensor, fused.

    Args:
        x: (B, C, *spatial), fp16 / bf16 / fp32 / fp64, contiguous or channels-last (e.g.
            ``torch.channels_last_3d``); other layouts are made contiguous first.
        weight, bias: optional (C,) affine parameters (any floating dtype, e.g. fp32 under autocast).
        eps: added to the variance.
        act: "none", "relu" or "leaky_relu" (with ``negative_slope``).

    Returns:
        y = act((x - mean) * rstd * weight + bias) with the mean and biased variance of each (b, c)
        over the spatial elements; x's shape, dtype and memory format. The same numbers as
        ``torch.group_norm(x, C, weight, bias, eps)`` + activation; differentiable in x, weight, bias.
    """
    _validate(x, weight, bias, act)
    if x.numel() == 0 and x.shape[0] > 0:  # C = 0 or an empty spatial size, which group_norm refuses
        y = x.clone()
        for p in (weight, bias):  # zero gradients for them, as group_norm gives (DDP: no unused parameter)
            if p is not None:
                y = y + p.sum().to(y.dtype) * 0
        return y
    if not _use_triton(x) or x.numel() == 0:  # an empty batch: group_norm (its gradients are zeros)
        return _reference(x, weight, bias, eps, act, negative_slope)
    return _fused(x, weight, bias, float(eps), act, float(negative_slope))


def _fused(x, weight, bias, eps, act, slope):
    # NOTE: the kernels read weight[c] / bias[c] at ptr + c: a strided or expanded parameter must be copied
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _fwd_op(x, weight, bias, eps, act, slope)[0]
