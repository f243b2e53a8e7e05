"""RouteMamba: the Mamba-1 token mixer with one causal conv and one SSM per route.

This is the mixer of Vim (bidirectional, ``bimamba_type="v2"``), Mamba(R) (the same, with register
tokens spliced into the routes) and SegMamba's tri-oriented Mamba (``bimamba_type="v3"``)::

    x (B, L, C) -> in_proj -> u, z                                         (B, L, E) each
    for every route k:  u_k = SiLU(causal_conv1d_k(u, in the order route k visits the tokens))
                        y_k = SSM_k(u_k) along route k                 (own x_proj/dt_proj/A/D)
    y = (sum_k y_k) * SiLU(z) [/ K]  -> out_proj                          (B, L, C)

The conv of route k is causal *along route k*: for a flipped route (Vim's backward scan) it is
causal in the backward direction, i.e. the classic ``flip -> causal conv -> flip``; with registers
spliced into the route it runs through the registers exactly where the scan visits them.

All K scans run in ONE call of :func:`mamba_dense.kernels.selective_scan`. Because the conv makes
the scanned input differ per route, while the operator reads one ``x`` per token, the K convolved
copies are laid side by side as K * L tokens and route k is shifted to its own copy
(``route[k] + k * L``). Each route still visits L tokens, so the scan's work is unchanged; the
price is that the per-route inputs dt/B/C are (B, K*L, K, .) with only the k-th block of copy k
ever read (K-fold memory for those three tensors). See ``NOTE(per-route x)`` below.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_dense.kernels import route_conv as _route_conv
from mamba_dense.kernels import routes as _routes
from mamba_dense.kernels import selective_scan

from .ssm import SSMCore, lowrank_dt, per_route_linear

__all__ = ["RouteMamba", "RoutePlan", "route_conv1d", "route_plan"]


_PLAN_CACHE: dict = {}


class RoutePlan(NamedTuple):
    """What :func:`route_conv1d` needs to know about a route, computed once on the CPU."""

    inv: torch.Tensor  # (K, L) step at which route k visits token t, -1 if never (``routes.inverse``)
    has_pad: bool  # some step is a padding step (-1)
    covers: bool  # every route visits every token


def route_plan(route: torch.Tensor, num_tokens: int) -> RoutePlan:
    """:class:`RoutePlan` of a (K, S) route over ``num_tokens`` tokens, cached per route tensor (one
    device-to-host copy per route; held weakly, see ``routes.cache_put``), built outside inference mode
    (a plan first made under Lightning's validate could not be saved for backward by a later step)."""
    key = _routes.tensor_key(route, num_tokens)
    plan = _routes.cache_get(_PLAN_CACHE, key, route)
    if plan is not None:
        return plan
    with torch.inference_mode(False):
        r = route.cpu()
        inv = _routes.inverse(r, num_tokens)
    plan = RoutePlan(inv, bool((r < 0).any()), bool((inv >= 0).all()))
    return _routes.cache_put(_PLAN_CACHE, key, route, plan, limit=512)


def route_conv1d(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, route: torch.Tensor, inv: torch.Tensor,
    *, has_pad: bool = True, covers: bool = False,
) -> torch.Tensor:
    """Depthwise conv along each route, causal in the route's visiting order.

    Args:
        u: (B, L, E) tokens.
        weight: (K, E, k) one depthwise kernel per route (``nn.Conv1d`` layout, tap k-1 = current step).
        bias: (K, E) or None.
        route: (K, S) int64 on u's device; -1 steps read zeros.
        inv: (K, L) from :func:`route_plan`, on u's device.
        has_pad, covers: from :func:`route_plan`; ``has_pad=False`` skips zeroing the padding steps and
            ``covers=True`` skips zeroing unvisited tokens (two full-size multiplies, and their
            gradients, that change nothing then). The defaults are always correct.

    Returns:
        (B, K, L, E): route k's conv output, back at token positions (0 where route k never visits).
    """
    B, L, E = u.shape
    K, S = route.shape
    ksz = weight.shape[-1]
    seq = u[:, route.clamp(min=0)]  # (B, K, S, E) in visiting order
    if has_pad:
        seq = seq * (route >= 0).to(u.dtype)[None, :, :, None]
    seq = seq.permute(0, 1, 3, 2).reshape(B, K * E, S)
    out = F.conv1d(
        seq,
        weight.reshape(K * E, 1, ksz).to(u.dtype),
        None if bias is None else bias.reshape(K * E).to(u.dtype),
        padding=ksz - 1,
        groups=K * E,
    )[..., :S]
    out = out.view(B, K, E, S).permute(0, 1, 3, 2)  # (B, K, S, E)
    idx = inv.clamp(min=0)[None, :, :, None].expand(B, K, L, E)
    out = out.gather(2, idx)
    if not covers:
        out = out * (inv >= 0).to(u.dtype)[None, :, :, None]
    return out


class RouteMamba(nn.Module):
    """Mamba-1 mixer with a causal conv and an SSM per route, all routes in one scan call.

    Args:
        dim: block width C.
        num_routes: K (2 for Vim's bidirectional scan, 3 for SegMamba's ToM).
        d_state: N (16 in Vim, Mamba(R), SegMamba).
        d_conv: conv width (4).
        expand: E = expand * C (2).
        dt_rank: "auto" = ceil(C / 16), or an int.
        conv_bias: bias of the per-route convs (True in Mamba).
        bias: bias of in_proj / out_proj (False in Mamba).
        divide_out: divide the sum of the K route outputs by K before out_proj (Vim and Mamba(R)
            do, ``if_divide_out=True``; SegMamba does not).

    Parameters, per route k (stacked over K so ``mamba_dense.convert`` maps the official
    ``conv1d``/``conv1d_b``/``conv1d_s``, ``x_proj``/``x_proj_b``, ... onto slot k):
    ``conv1d_weight`` (K, E, d_conv), ``conv1d_bias`` (K, E), and the SSM's
    ``ssm.x_proj_weight`` (K, R + 2N, E), ``ssm.dt_projs_weight`` (K, E, R),
    ``ssm.dt_projs_bias`` (K, E), ``ssm.A_logs`` (K, E, N), ``ssm.Ds`` (K, E).

    Shapes: forward(x (B, L, C), route (K, S) over the L tokens) -> (B, L, C).

    Example:
        >>> from mamba_dense.kernels import routes
        >>> m = RouteMamba(16, num_routes=2, d_state=4)
        >>> m(torch.randn(2, 10, 16), routes.bidirectional(10)).shape
        torch.Size([2, 10, 16])
    """

    def __init__(
        self,
        dim: int,
        num_routes: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        conv_bias: bool = True,
        bias: bool = False,
        divide_out: bool = False,
    ) -> None:
        super().__init__()
        self.dim, self.num_routes, self.d_conv = dim, num_routes, d_conv
        self.d_inner = E = int(expand * dim)
        self.divide_out = divide_out
        self.in_proj = nn.Linear(dim, 2 * E, bias=bias)
        self.conv1d_weight = nn.Parameter(torch.empty(num_routes, E, d_conv))
        self.conv1d_bias = nn.Parameter(torch.empty(num_routes, E)) if conv_bias else None
        self.act = nn.SiLU()
        self.ssm = SSMCore(E, num_routes, d_state=d_state, dt_rank=dt_rank, d_model=dim)
        self.out_proj = nn.Linear(E, dim, bias=bias)
        # NOTE: one bias per route, stacked into (K, E): 1-D biases in the official Vim / Mamba(R) (conv1d(_b),
        # dt_proj(_b)), which timm's optimizer rule keeps out of weight decay; tasks._optim reads this flag.
        for p in (self.conv1d_bias, self.ssm.dt_projs_bias):
            if p is not None:
                p._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_conv_parameters()

    @torch.no_grad()
    def reset_conv_parameters(self) -> None:
        """``nn.Conv1d``'s default init for a depthwise kernel (fan_in = d_conv)."""
        bound = 1.0 / math.sqrt(self.d_conv)
        nn.init.uniform_(self.conv1d_weight, -bound, bound)
        if self.conv1d_bias is not None:
            nn.init.uniform_(self.conv1d_bias, -bound, bound)

    def scan_routes(
        self, u: torch.Tensor, route: torch.Tensor, merge: str = "none", inv: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-route conv + SiLU + SSM of u (B, L, E): -> (B, K, L, E), before the gate.

        Route k's output sits at the token positions of route k (D * x skip included).
        ``merge="sum"`` returns the sum over the routes, (B, L, E), added by the scan operator
        (its backward then reads one gradient per token instead of a copy per route).
        ``inv``: ``routes.inverse(route, L)`` already on u's device, with ``route`` there too (what
        ``routes.device_route`` gives under ``torch.compile``, where the per-route plan cache, keyed by
        tensor identity, cannot run); by default both come from the plan cache.
        """
        B, L, E = u.shape
        K = self.num_routes
        if route.shape[0] != K:
            raise ValueError(f"route has {route.shape[0]} routes but this RouteMamba was built with num_routes={K}")
        dev = u.device
        if inv is None:
            plan = route_plan(route, L)
            route_d = _routes.to_device(route, dev)
            inv_d = _routes.to_device(plan.inv, dev)
        else:
            if tuple(inv.shape) != (K, L) or inv.device != dev or route.device != dev:
                raise ValueError(f"inv must be routes.inverse(route, L) of shape ({K}, {L}) on {dev} with the "
                                 f"route there too, got inv {tuple(inv.shape)} on {inv.device}, "
                                 f"route on {route.device}")
            route_d, inv_d, plan = route, inv, None
        if _route_conv.use_triton(u):
            # gather, conv, scatter back, SiLU and the (B, L, K, E) layout in one kernel
            xk = _route_conv.route_conv1d_fused(u, self.conv1d_weight, self.conv1d_bias, route_d, inv_d)
        else:
            if plan is None and route.device.type == "cpu" and not _routes._compiling():
                plan = route_plan(route, L)  # cached by identity: skips the masks that change nothing
            # without a plan: the settings that are always correct
            has_pad, covers = (plan.has_pad, plan.covers) if plan is not None else (True, False)
            uk = self.act(route_conv1d(u, self.conv1d_weight, self.conv1d_bias, route_d, inv_d,
                                       has_pad=has_pad, covers=covers))
            xk = uk.transpose(1, 2).contiguous()  # (B, L, K, E): one input per route

        # Per-route projections of each route's own input, token-major (B, L, K, .).
        ssm = self.ssm
        N, R = ssm.d_state, ssm.dt_rank
        x_dbl = per_route_linear(xk, ssm.x_proj_weight)  # (B, L, K, R + 2N)
        _, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=-1)
        dt = lowrank_dt(x_dbl.reshape(B, L, -1), ssm.dt_projs_weight, N)  # (B, L, K, E)

        # The operator takes a per-route x (B, L, K, E) directly, so each route scans its own conv
        # output; parameters stay >= fp32 under autocast (the operator accepts mixed dtypes).
        pdt = torch.promote_types(ssm.A_logs.dtype, torch.float32)
        A = (-torch.exp(ssm.A_logs.to(pdt))).contiguous()
        y = selective_scan(
            xk,
            dt.contiguous(),
            A,
            Bs.contiguous(),
            Cs.contiguous(),
            ssm.Ds.to(pdt).contiguous(),
            ssm.dt_projs_bias.to(pdt).contiguous(),
            route=route_d,
            merge=merge,
            dt_softplus=True,
        )  # (B, L, K, E), or (B, L, E) summed over the routes
        return y.transpose(1, 2) if merge == "none" else y

    def forward(self, x: torch.Tensor, route: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)
        y = self.scan_routes(u, route, merge="sum", inv=inv)  # u: a strided view of in_proj's output
        if self.divide_out:
            y = y / self.num_routes
        return self.out_proj(y * self.act(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_inner={self.d_inner}, routes={self.num_routes}, d_conv={self.d_conv}"
