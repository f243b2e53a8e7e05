"""Depthwise causal conv1d along scan routes, + SiLU, fused with the route gather (Triton).

Mamba's mixer runs a short causal depthwise conv (width 4) before its SSM. Along a scan route
(:mod:`mamba_dense.kernels.routes`) "causal" means in the route's visiting order, so the PyTorch
path (``mamba_dense.layers.seq_mixer.route_conv1d``) gathers the tokens into visiting order, masks
the padding steps, transposes for ``F.conv1d``, scatters the result back to token positions,
masks unvisited tokens, applies SiLU and transposes again into the (B, L, K, E) layout the scan
reads: about eight full-size passes, and PyTorch's depthwise conv1d runs as a generic 2D kernel
(H100, SegMamba stage 1 at 128^3: 3.2 ms forward and 6.2 ms backward per call for 2 x 288 x
262,144 elements, ~20x its memory time).

Here one kernel reads the tokens through the route and writes the (B, L, K, E) result:

    out[b, t, k, e] = act(bias[k, e] + sum_j w[k, e, j] * u[b, route[k, s - (KSZ-1) + j], e]),
    s = inv[k, t]  (the step at which route k visits token t),

with zeros for steps before the start and for padding steps (-1), and out = 0 where route k never
visits t (``inv = -1``). The backward recomputes the conv (no pre-activation is stored):

    1. ``_rconv_bwd_pre_kernel`` (token order): gpre = g * act'(pre), and per-tile partial sums of
       gpre (dbias) and gpre * tap input (dweight), reduced afterwards (deterministic, no atomics);
    2. ``_rconv_bwd_du_kernel`` (token order): du[b, t, e] = sum_k sum_j w[k, e, j] *
       gpre[b, route[k, s + (KSZ-1) - j], k, e], for each token the routes' later steps that read it.

Compute is in fp32 (fp64 for fp64 inputs) with the weights as given (fp32 parameters stay fp32
under autocast); output and input gradient in u's dtype. ``u`` may be a strided view (the first
half of ``in_proj``'s output) as long as its channels are contiguous.

CUDA tensors run the kernels; CPU tensors take the PyTorch path in ``seq_mixer.route_conv1d``
unless ``MAMBA_DENSE_TRITON_CPU=1`` and ``TRITON_INTERPRET=1`` (the tests). The kernels are custom
ops (``mamba_dense::route_conv_fwd`` / ``_bwd``): ``torch.compile`` keeps them as opaque calls.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _triton_on_cpu
from ._launch import launch
from .routes import _compiling
from .triton_scan import _ct, _empty, on_device

# Tokens and channels per program, one warp: the H100 sweep of session 10 (benchmarks/RESULTS.md) ran
# SegMamba stage 1 forward / backward in 0.352 / 1.100 ms against 0.441 / 1.413 with (128, 32, 4
# warps), and was as fast or faster at stages 2-4. The work per thread is the same (32 elements);
# why the one-warp programs run faster was not profiled.
BLOCK_T = 32
MAX_BLOCK_E = 32
NUM_WARPS = 1


@triton.jit
def _coords(n_ttile, L, E, BT: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_ttile).to(tl.int64)
    t = (pid % n_ttile) * BT + tl.arange(0, BT)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    tmask, emask = t < L, e < E
    return pid, b, t, tmask, e, emask, tmask[:, None] & emask[None, :]


@triton.jit
def _visit(inv_ptr, k, L, t, tmask):
    """The step s at which route k visits each token t (-1: never), and whether it does."""
    s = tl.load(inv_ptr + k * L + t, mask=tmask, other=-1)
    return s, s >= 0


@triton.jit
def _blke(b, L, t, K, k, E, e):
    """Offsets of (token t, route k, channel e) of batch item b in a (B, L, K, E) tensor."""
    return ((b * L + t[:, None]) * K + k) * E + e[None, :]


@triton.jit
def _taps(u_ptr, route_ptr, b, k, s, vis, e, emask, S, stride_ub, stride_ul,
          KSZ: tl.constexpr, KP: tl.constexpr, CT: tl.constexpr):
    """All KSZ taps of route k at the tokens' steps s as one (BT, KP, BE) gather (tap j at step
    s + j - (KSZ-1); 0 before the route's start, at padding and for j >= KSZ)."""
    j = tl.arange(0, KP)
    sj = s[:, None] + (j[None, :] - (KSZ - 1))
    ok = vis[:, None] & (j[None, :] < KSZ) & (sj >= 0) & (sj < S)
    src = tl.load(route_ptr + k * S + sj, mask=ok, other=-1)
    ok = ok & (src >= 0)
    ptr = u_ptr + b * stride_ub + src[:, :, None] * stride_ul + e[None, None, :]
    return tl.load(ptr, mask=ok[:, :, None] & emask[None, None, :], other=0.0).to(CT)


@triton.jit
def _conv(x, w_ptr, b_ptr, k, e, emask, E, HAS_BIAS: tl.constexpr, KSZ: tl.constexpr, KP: tl.constexpr,
          CT: tl.constexpr):
    """The conv (before the activation) of route k from its taps x (BT, KP, BE)."""
    j = tl.arange(0, KP)
    w = tl.load(w_ptr + (k * E + e[None, :]) * KSZ + j[:, None], mask=(j < KSZ)[:, None] & emask[None, :],
                other=0.0).to(CT)
    pre = tl.sum(x * w[None, :, :], axis=1)
    if HAS_BIAS:
        pre += tl.load(b_ptr + k * E + e, mask=emask, other=0.0).to(CT)[None, :]
    return pre


@triton.jit
def _rconv_fwd_kernel(u_ptr, w_ptr, b_ptr, route_ptr, inv_ptr, out_ptr, L, S, E, K, stride_ub, stride_ul, n_ttile,
                HAS_BIAS: tl.constexpr, ACT: tl.constexpr, KSZ: tl.constexpr,
                BT: tl.constexpr, BE: tl.constexpr, CT: tl.constexpr, KP: tl.constexpr):
    _pid, b, t, tmask, e, emask, m2 = _coords(n_ttile, L, E, BT, BE)
    for k in range(K):
        s, vis = _visit(inv_ptr, k, L, t, tmask)
        x = _taps(u_ptr, route_ptr, b, k, s, vis, e, emask, S, stride_ub, stride_ul, KSZ, KP, CT)
        y = _conv(x, w_ptr, b_ptr, k, e, emask, E, HAS_BIAS, KSZ, KP, CT)
        if ACT:
            y = y * tl.sigmoid(y)
        y = tl.where(vis[:, None], y, 0.0)
        tl.store(out_ptr + _blke(b, L, t, K, k, E, e), y.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _rconv_bwd_pre_kernel(u_ptr, w_ptr, b_ptr, route_ptr, inv_ptr, g_ptr, gpre_ptr, dw_part_ptr, db_part_ptr,
                    L, S, E, K, stride_ub, stride_ul, n_ttile,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, KSZ: tl.constexpr,
                    BT: tl.constexpr, BE: tl.constexpr, CT: tl.constexpr, KP: tl.constexpr):
    """gpre = g * act'(pre) -> (B, L, K, E); partials (P, K, KSZ, E) of dweight and (P, K, E) of dbias.
    The KSZ taps (KP: KSZ rounded up to a power of 2) are gathered once and serve both the
    recomputed conv and the dweight partials (H100, session 11: SegMamba stage 1 backward 1.105 ->
    0.960 ms against a second gather of the taps for dweight)."""
    pid, b, t, tmask, e, emask, m2 = _coords(n_ttile, L, E, BT, BE)
    j = tl.arange(0, KP)
    wmask = (j < KSZ)[:, None] & emask[None, :]
    for k in range(K):
        s, vis = _visit(inv_ptr, k, L, t, tmask)
        off = _blke(b, L, t, K, k, E, e)
        g = tl.load(g_ptr + off, mask=m2 & vis[:, None], other=0.0).to(CT)
        x = _taps(u_ptr, route_ptr, b, k, s, vis, e, emask, S, stride_ub, stride_ul, KSZ, KP, CT)
        if ACT:
            pre = _conv(x, w_ptr, b_ptr, k, e, emask, E, HAS_BIAS, KSZ, KP, CT)
            sg = tl.sigmoid(pre)
            g = g * sg * (1.0 + pre * (1.0 - sg))
        tl.store(gpre_ptr + off, g.to(gpre_ptr.dtype.element_ty), mask=m2)
        tl.store(db_part_ptr + (pid * K + k) * E + e, tl.sum(g, axis=0), mask=emask)
        tl.store(dw_part_ptr + ((pid * K + k) * KSZ + j[:, None]) * E + e[None, :],
                 tl.sum(g[:, None, :] * x, axis=0), mask=wmask)


@triton.jit
def _rconv_bwd_du_kernel(gpre_ptr, w_ptr, route_ptr, inv_ptr, du_ptr, L, S, E, K, n_ttile,
                   KSZ: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, CT: tl.constexpr):
    """du[b, t] = sum over routes k and taps j of w[k, :, j] * gpre at the step s + KSZ-1-j of route k."""
    _pid, b, t, tmask, e, emask, m2 = _coords(n_ttile, L, E, BT, BE)
    acc = tl.zeros([BT, BE], CT)
    for k in range(K):
        s, vis = _visit(inv_ptr, k, L, t, tmask)
        for j in tl.static_range(KSZ):
            sd = s + (KSZ - 1 - j)
            ok = vis & (sd < S)
            dst = tl.load(route_ptr + k * S + sd, mask=ok, other=-1)
            ok = ok & (dst >= 0)
            gp = tl.load(gpre_ptr + _blke(b, L, dst, K, k, E, e),
                         mask=ok[:, None] & emask[None, :], other=0.0).to(CT)
            w = tl.load(w_ptr + (k * E + e) * KSZ + j, mask=emask, other=0.0).to(CT)
            acc += gp * w[None, :]
    off = (b * L + t[:, None]) * E + e[None, :]
    tl.store(du_ptr + off, acc.to(du_ptr.dtype.element_ty), mask=m2)


def _cfg() -> tuple[int, int, int]:
    """(tokens per program, max channels per program, warps); MAMBA_DENSE_RCONV_CFG="BT,BE,warps"
    overrides (for tuning)."""
    env = os.environ.get("MAMBA_DENSE_RCONV_CFG")
    if env:
        bt, be, w = (int(v) for v in env.split(","))
        return bt, be, w
    return BLOCK_T, MAX_BLOCK_E, NUM_WARPS


def _grid(B: int, L: int, E: int) -> tuple[tuple[int, int], int, int]:
    bt, max_be, _ = _cfg()
    be = min(triton.next_power_of_2(E), max_be)
    n_ttile = triton.cdiv(L, bt)
    return (B * n_ttile, triton.cdiv(E, be)), n_ttile, be


def _meta(dtype: torch.dtype, ksz: int, be: int) -> dict:
    bt, _, warps = _cfg()
    return dict(KSZ=ksz, BT=bt, BE=be, CT=_ct(dtype), num_warps=warps)


# Registered as custom ops tied by register_autograd: opaque to torch.compile (no graph break; the
# compiled graph runs these kernels), with fake implementations for tracing.


@torch.library.custom_op("mamba_dense::route_conv_fwd", mutates_args=())
def _fwd_op(u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], route: torch.Tensor,
            inv: torch.Tensor, act: bool) -> torch.Tensor:
    B, L, E = u.shape
    K, S = route.shape
    ksz = weight.shape[-1]
    weight = weight.contiguous()
    grid, n_ttile, be = _grid(B, L, E)
    out = _empty(B, L, K, E, device=u.device, dtype=u.dtype)
    with on_device(u):
        launch(_rconv_fwd_kernel, grid,
            u, weight, weight if bias is None else bias, route, inv, out, L, S, E, K,
            u.stride(0), u.stride(1), n_ttile, HAS_BIAS=bias is not None, ACT=act,
            KP=triton.next_power_of_2(ksz), **_meta(u.dtype, ksz, be))
    return out


@_fwd_op.register_fake
def _(u, weight, bias, route, inv, act):
    return u.new_empty((u.shape[0], u.shape[1], route.shape[0], u.shape[2]))


@torch.library.custom_op("mamba_dense::route_conv_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            route: torch.Tensor, inv: torch.Tensor, act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du (B, L, E) contiguous, dweight (K, E, KSZ), dbias (K, E); dbias is empty without a bias)."""
    B, L, E = u.shape
    K, S = route.shape
    ksz = weight.shape[-1]
    weight = weight.contiguous()
    g = g.contiguous()
    grid, n_ttile, be = _grid(B, L, E)
    meta = _meta(u.dtype, ksz, be)
    P = grid[0]
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    gpre = _empty(B, L, K, E, device=u.device, dtype=g.dtype)
    dw_part = _empty(P, K, ksz, E, device=u.device, dtype=cdt)
    db_part = _empty(P, K, E, device=u.device, dtype=cdt)
    du = _empty(B, L, E, device=u.device, dtype=u.dtype)
    with on_device(u):
        launch(_rconv_bwd_pre_kernel, grid,
            u, weight, weight if bias is None else bias, route, inv, g, gpre, dw_part, db_part,
            L, S, E, K, u.stride(0), u.stride(1), n_ttile, HAS_BIAS=bias is not None, ACT=act,
            KP=triton.next_power_of_2(ksz), **meta)
        launch(_rconv_bwd_du_kernel, grid, gpre, weight, route, inv, du, L, S, E, K, n_ttile, **meta)
    dw = dw_part.sum(0).transpose(1, 2).contiguous().to(weight.dtype)  # (K, E, KSZ)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else weight.new_empty((0,))
    return du, dw, db


@_bwd_op.register_fake
def _(g, u, weight, bias, route, inv, act):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    return u.new_empty(u.shape), weight.new_empty(weight.shape), db


def _setup_context(ctx, inputs, output):
    u, weight, bias, route, inv, act = inputs
    ctx.save_for_backward(u, weight, bias, route, inv)
    ctx.act = act


def _backward_rule(ctx, g):
    u, weight, bias, route, inv = ctx.saved_tensors
    du, dw, db = _bwd_op(g, u, weight, bias, route, inv, ctx.act)
    return du, dw, (db if bias is not None else None), None, None, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def use_triton(u: torch.Tensor) -> bool:
    """CUDA -> the kernels; ``MAMBA_DENSE_TRITON_CPU=1`` runs them on CPU
    tensors through Triton's interpreter (with ``TRITON_INTERPRET=1``)."""
    return u.is_cuda or _triton_on_cpu(u)


def route_conv1d_fused(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, route: torch.Tensor,
                       inv: torch.Tensor, act: bool = True) -> torch.Tensor:
    """Depthwise causal conv along each route (+ SiLU with ``act``), in token order.

    Args:
        u: (B, L, E), channels contiguous (``u.stride(-1) == 1``; other strides are free).
        weight: (K, E, KSZ), ``nn.Conv1d``'s depthwise layout per route (tap KSZ-1 = current step).
        bias: (K, E) or None.
        route: (K, S) int64 on u's device, each token at most once per route, -1 = padding step.
        inv: (K, L) int64 on u's device, ``routes.inverse(route, L)``.
        act: apply SiLU.

    Returns:
        (B, L, K, E) in u's dtype: route k's conv output at token t, 0 where route k never visits t.
    """
    _validate(u, weight, bias, route, inv)
    if u.stride(-1) != 1:
        u = u.contiguous()
    # NOTE: the kernels read bias[k, e] at ptr + k * E + e (weight is made contiguous in the ops)
    bias = None if bias is None else bias.contiguous()
    return _fwd_op(u, weight, bias, route.contiguous(), inv.contiguous(), bool(act))


def _validate(u, weight, bias, route, inv) -> None:
    """ValueError naming the argument, the shape it got and the shape it needs."""
    if u.dim() != 3 or not u.is_floating_point():
        raise ValueError(f"u must be a floating (B, L, E) tensor, got shape {tuple(u.shape)} {u.dtype}")
    B, L, E = u.shape
    if route.dim() != 2 or route.dtype != torch.long:
        raise ValueError(f"route must be an int64 (K, S) tensor, got shape {tuple(route.shape)} {route.dtype}")
    K = route.shape[0]
    need = {"weight": (weight, (K, E)), "bias": (bias, (K, E)), "inv": (inv, (K, L))}
    for name, (t, shape) in need.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if name == "inv" and t.dtype != torch.long:
            raise ValueError(f"inv must be int64 (routes.inverse(route, L)), got {t.dtype}")
        if name != "inv" and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        got = tuple(t.shape[:2]) if name == "weight" else tuple(t.shape)
        if got != shape or (name == "weight" and t.dim() != 3):
            want = f"({K}, {E}, d_conv)" if name == "weight" else str(shape)
            raise ValueError(f"{name} must have shape {want} for u {tuple(u.shape)} and {K} routes, "
                             f"got {tuple(t.shape)}")
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
    if route.device != u.device:
        raise ValueError(f"route is on {route.device} but u is on {u.device}")
    if not _compiling():  # the kernels gather u through route and inv: indices past their ends read other memory
        from . import check_route_values

        try:
            check_route_values(route, L)
        except ValueError as err:
            raise ValueError(f"route (over the L = {L} tokens of u): {err}") from None
        try:
            check_route_values(inv, route.shape[1])
        except ValueError as err:
            raise ValueError(f"inv is not routes.inverse(route, L) of this route: {err}") from None
