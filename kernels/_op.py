"""``torch.library`` registration of the Triton scan: custom ops, fake kernels and autograd.

``mamba_dense::scan_fwd`` and ``mamba_dense::scan_bwd`` are opaque to ``torch.compile`` (no
graph break inside them), have fake implementations (meta device, FakeTensor tracing) and are
tied together with ``register_autograd`` so ``torch.autograd.gradcheck`` runs through them.

Eager calls on plain tensors skip the dispatcher: ``_EagerScan``, an ``autograd.Function``, calls
the same Triton forward and backward (``use_eager_path`` says which path a call takes).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._launch import getenv
from .routes import _compiling

_TS = None


def _ts():
    """kernels.triton_scan, imported on first use (the meta device and FakeTensor tracing need no
    Triton) and then held here: a function-level import costs about a microsecond per call."""
    global _TS
    if _TS is None:
        from . import triton_scan

        _TS = triton_scan
    return _TS


def tile_size(N: int, Dm: int, dtype: torch.dtype) -> int:
    """Steps between the states the forward saves (the backward's tile)."""
    from .triton_scan import _config

    return _config(N, Dm, dtype)[0]


def _merge_str(merge_none: bool) -> str:
    return "none" if merge_none else "sum"


def _run_fwd(x, dt, A, B, C, D, dt_bias, route, merge_none, dt_softplus, out_dtype, save_states):
    """The Triton forward on x's GPU: (y, states). Shared by the registered op and _EagerScan."""
    ts = _ts()
    with ts.on_device(x):
        return ts.scan_fwd(x, dt, A, B, C, D, dt_bias, route, _merge_str(merge_none), dt_softplus, out_dtype, save_states)


def _run_bwd(dy, x, dt, A, B, C, D, dt_bias, route, states, merge_none, dt_softplus):
    """The Triton backward on x's GPU: (dx, ddt, dA, dB, dC, dD or None, dbias or None)."""
    ts = _ts()
    with ts.on_device(x):
        return ts.scan_bwd(dy, x, dt, A, B, C, D, dt_bias, route, states, _merge_str(merge_none), dt_softplus)


@torch.library.custom_op("mamba_dense::checked_route", mutates_args=())
def checked_route(route: Tensor, num_tokens: int) -> Tensor:
    """A copy of route after check_route_values(route, num_tokens): the value check of a compiled graph
    that runs the CPU reference (selective_scan leaves its own check out while torch.compile traces,
    since it needs the values; an op's body runs on the real tensors at every call, and the copy makes
    the scan depend on it, so the compiler keeps it). Without it an out-of-range index reached the
    reference's gather as torch's IndexError or RuntimeError instead of this ValueError."""
    from . import check_route_values

    check_route_values(route, num_tokens)
    return route.clone()


@checked_route.register_fake
def _(route, num_tokens):
    return torch.empty_like(route)


@torch.library.custom_op("mamba_dense::scan_fwd", mutates_args=())
def scan_fwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    dt_bias: Optional[Tensor],
    route: Tensor,
    merge_none: bool,
    dt_softplus: bool,
    out_dtype: torch.dtype,
    save_states: bool,
) -> tuple[Tensor, Tensor]:
    # the route's values, checked here as well: selective_scan's own check is left out while
    # torch.compile traces it (a sync), but this body runs on the real tensors at every call
    from . import check_route_values

    check_route_values(route, x.shape[1])
    return _run_fwd(x, dt, A, B, C, D, dt_bias, route, merge_none, dt_softplus, out_dtype, save_states)


@scan_fwd.register_fake
def _(x, dt, A, B, C, D, dt_bias, route, merge_none, dt_softplus, out_dtype, save_states):
    batch, L, Dm = x.shape[0], x.shape[1], x.shape[-1]
    K, S = route.shape
    N = A.shape[2]
    shape = (batch, L, K, Dm) if merge_none else (batch, L, Dm)
    y = x.new_empty(shape, dtype=out_dtype)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if save_states:
        T = tile_size(N, Dm, x.dtype)
        states = x.new_empty((batch, K, -(-S // T), N, Dm), dtype=cdt)
    else:
        states = x.new_empty((0,), dtype=cdt)
    return y, states


@torch.library.custom_op("mamba_dense::scan_bwd", mutates_args=())
def scan_bwd(
    dy: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    dt_bias: Optional[Tensor],
    route: Tensor,
    states: Tensor,
    merge_none: bool,
    dt_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, ddt, dA, dB, dC, dD, dbias = _run_bwd(dy, x, dt, A, B, C, D, dt_bias, route, states, merge_none, dt_softplus)
    K, Dm = A.shape[0], A.shape[1]
    if dD is None:
        dD = x.new_zeros((K, Dm), dtype=A.dtype)
    if dbias is None:
        dbias = x.new_zeros((K, Dm), dtype=A.dtype)
    return dx, ddt, dA, dB, dC, dD, dbias


@scan_bwd.register_fake
def _(dy, x, dt, A, B, C, D, dt_bias, route, states, merge_none, dt_softplus):
    K, Dm = A.shape[0], A.shape[1]
    dD = torch.empty_like(D) if D is not None else x.new_empty((K, Dm), dtype=A.dtype)
    db = torch.empty_like(dt_bias) if dt_bias is not None else x.new_empty((K, Dm), dtype=A.dtype)
    return (
        torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A),
        torch.empty_like(B), torch.empty_like(C), dD, db,
    )


_NO_STATES_MSG = (
    "selective_scan was run without saving states (no input required grad at forward time); "
    "cannot backpropagate through it"
)


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, dt_bias, route, merge_none, dt_softplus, out_dtype, save_states = inputs
    _, states = output
    # the states output carries no gradient: do not have autograd allocate and zero a states-sized
    # dstates (150 MB at S5 N=16) for every backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, route, states)
    ctx.merge_none = merge_none
    ctx.dt_softplus = dt_softplus
    ctx.has_D = D is not None
    ctx.has_bias = dt_bias is not None
    ctx.save_states = save_states


def _saved(ctx):
    """The forward's saved tensors (x, dt, A, B, C, D, dt_bias, route, states), or why there are none."""
    if not ctx.save_states:
        raise RuntimeError(_NO_STATES_MSG)
    return ctx.saved_tensors


def _backward(ctx, dy, dstates):
    if dy is None:  # y took no part in the loss
        return (None,) * 12
    x, dt, A, B, C, D, dt_bias, route, states = _saved(ctx)
    dx, ddt, dA, dB, dC, dD, dbias = scan_bwd(
        dy.contiguous(), x, dt, A, B, C, D, dt_bias, route, states, ctx.merge_none, ctx.dt_softplus
    )
    return (
        dx, ddt, dA, dB, dC,
        dD if ctx.has_D else None, dbias if ctx.has_bias else None,
        None, None, None, None, None,
    )


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerScan(torch.autograd.Function):
    """The eager fast path: the same Triton forward and backward as the registered ops, called
    directly from one ``autograd.Function``.

    ``torch.library.custom_op`` with ``register_autograd`` costs host time on every call (the
    dispatcher round trips, the op's autograd wrapper, the output alias checks): on the H100 host
    (benchmarks/RESULTS.md, session 12) a forward + backward at S3 (1024 x 1024, batch 1) took 1.48 ms
    of host time for 0.68 ms of kernels, so the op was host-bound. Compiled graphs, FakeTensor / meta
    tracing and tensor subclasses keep using the registered ops (``use_eager_path``)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, route, merge_none, dt_softplus, out_dtype, save_states):
        y, states = _run_fwd(x, dt, A, B, C, D, dt_bias, route, merge_none, dt_softplus, out_dtype, save_states)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, route, states)
        ctx.merge_none, ctx.dt_softplus, ctx.save_states = merge_none, dt_softplus, save_states
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 12
        grads = _run_bwd(dy.contiguous(), *_saved(ctx), ctx.merge_none, ctx.dt_softplus)
        return (*grads, None, None, None, None, None)


def use_eager_path(x: Tensor) -> bool:
    """Plain tensors in eager mode take ``_EagerScan``; ``torch.compile`` / export tracing, tensor
    subclasses (FakeTensor, functional tensors), an active dispatch mode and the meta device take the
    registered ops. MAMBA_DENSE_SCAN_EAGER=op sends eager calls through the ops too (for comparison)."""
    return (
        not _compiling()  # first: nothing after it is traced by dynamo
        and type(x) is Tensor
        and x.device.type != "meta"
        and torch._C._len_torch_dispatch_stack() == 0
        and getenv("MAMBA_DENSE_SCAN_EAGER", "function") != "op"
    )


def selective_scan_op(x, dt, A, B, C, D, dt_bias, route, merge, dt_softplus, out_dtype):
    """Run the scan (the eager fast path or the registered op); states are saved only when a
    gradient can flow."""
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, dt_bias)
    )
    args = (x, dt, A, B, C, D, dt_bias, route, merge == "none", dt_softplus, out_dtype or x.dtype, need_grad)
    if use_eager_path(x):
        if not need_grad:
            # inference: no graph to record, so no autograd.Function around the forward
            return _run_fwd(*args)[0]
        return _EagerScan.apply(*args)
    y, _ = scan_fwd(*args)
    return y
