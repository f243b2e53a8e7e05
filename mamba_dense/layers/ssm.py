"""Per-route selective-SSM parameters and the call to the shared scan operator.

:class:`SSMCore` owns, for K routes over D channels with state size N and dt rank R:

=================  ===============  ==================================================
``x_proj_weight``  (K, R + 2N, D)   token -> (dt_low_rank, B, C), one projection per route
``dt_projs_weight`` (K, D, R)       low-rank dt -> per-channel dt
``dt_projs_bias``  (K, D)           dt bias, init so softplus(bias) ~ logU[dt_min, dt_max]
``A_logs``         (K, D, N)        A = -exp(A_logs); init log(1..N) (S4D-real)
``Ds``             (K, D)           skip, init 1
=================  ===============  ==================================================

and calls :func:`mamba_dense.kernels.selective_scan` once for all routes. The projections are
computed token-major on the (batch, L, D) tensor: every route reads the same token, so the
per-route dt/B/C of token t do not depend on where the route visits t and no (batch, K, D, L)
copy of the input is ever built. The routes (``kernels.routes``) decide the visiting order and
the kernel merges the routes' outputs back onto the tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_dense.kernels import routes as _routes
from mamba_dense.kernels import selective_scan

__all__ = ["SSMCore", "auto_dt_rank", "dt_bias_init_", "A_log_init_", "lowrank_dt", "per_route_linear"]


def auto_dt_rank(d_model: int) -> int:
    """Mamba/VMamba's ``dt_rank="auto"``: ceil(d_model / 16) (d_model is the block width, not d_inner)."""
    return math.ceil(d_model / 16)


@torch.no_grad()
def dt_bias_init_(bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Fill ``bias`` so that softplus(bias) = dt with log(dt) ~ U[log dt_min, log dt_max], dt >= floor."""
    dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


@torch.no_grad()
def A_log_init_(A_logs: torch.Tensor) -> torch.Tensor:
    """S4D-real init along the last dim: A_logs[..., n] = log(n + 1)."""
    n = A_logs.shape[-1]
    return A_logs.copy_(torch.log(torch.arange(1, n + 1, dtype=A_logs.dtype, device=A_logs.device)).expand_as(A_logs))


_BLOCK_DIAG_EXCESS: list[int] | None = None  # set by encoders.complexity while counting


def _block_diag(w: torch.Tensor) -> torch.Tensor:
    """(K, P, Q) -> the (K P, K Q) block-diagonal matrix with blocks w[k], by one masked product."""
    K, P, Q = w.shape
    eye = torch.eye(K, dtype=w.dtype, device=w.device)
    return (eye[:, None, :, None] * w[:, :, None, :]).reshape(K * P, K * Q)


def per_route_linear(xk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[..., k, :] = weight[k] @ xk[..., k, :] for xk (..., K, E) and weight (K, C, E) -> (..., K, C).

    One matrix product with the block-diagonal (K E, K C) weight instead of a K-batched product:
    the batched form permutes its operands and, for C = R + 2N such as 44, writes rows whose byte
    length is not a multiple of 16, which sends bf16 GEMMs to slow misaligned kernels (see
    :func:`lowrank_dt`). The K-fold FLOPs of this small projection are cheap next to that.
    """
    K, C, E = weight.shape
    if _BLOCK_DIAG_EXCESS is not None:
        _BLOCK_DIAG_EXCESS.append(xk[..., 0, 0].numel() * K * C * E * (K - 1))
    w_bd = _block_diag(weight.to(xk.dtype).transpose(1, 2))  # (K E, K C)
    return torch.matmul(xk.reshape(*xk.shape[:-2], K * E), w_bd).view(*xk.shape[:-2], K, C)


def lowrank_dt(x_dbl: torch.Tensor, dt_projs_weight: torch.Tensor, d_state: int) -> torch.Tensor:
    """dt (..., K, D) = per-route dt_proj of the low-rank part of x_dbl (..., K * (R + 2N)).

    One matrix product with a block-diagonal (K (R + 2N), K D) weight whose B/C rows are zero,
    instead of a K-batched product over the rank R: R = ceil(C / 16) is 6 for C = 96, and a
    contraction that short and misaligned runs on slow fallback GEMM kernels (measured on an H100:
    12 ms of a 72 ms vmamba_tiny training step). The zero rows cost 2N/R more FLOPs of a
    tiny product; the output comes out contiguous, ready for the scan.
    """
    K, Dm, R = dt_projs_weight.shape
    if _BLOCK_DIAG_EXCESS is not None:  # model_complexity counts the low-rank product, as the papers do
        _BLOCK_DIAG_EXCESS.append(x_dbl[..., 0].numel() * K * Dm * (K * (R + 2 * d_state) - R))
    w = F.pad(dt_projs_weight.to(x_dbl.dtype).transpose(1, 2), (0, 0, 0, 2 * d_state))  # (K, R+2N, D)
    w_bd = _block_diag(w)  # (K (R+2N), K D)
    return torch.matmul(x_dbl, w_bd).view(*x_dbl.shape[:-1], K, Dm)


class SSMCore(nn.Module):
    """K per-route selective SSMs over D channels, run by the shared scan operator.

    Args:
        d_inner: channels D of the scanned tokens.
        num_routes: K, the number of routes the scan will be given (each has its own parameters).
        d_state: N.
        dt_rank: R, or "auto" for ceil(d_model / 16).
        d_model: block width used by ``dt_rank="auto"`` (default: d_inner).
        dt_min, dt_max, dt_init_floor, dt_scale: dt initialisation (Mamba defaults).

    Shapes:
        forward(x (B, L, D), route (K, S) int64) -> (B, L, D) for merge="sum",
        (B, L, K, D) for merge="none" (tokens no route visits get 0).

    Example:
        >>> from mamba_dense.kernels import routes
        >>> core = SSMCore(d_inner=8, num_routes=4, d_state=2)
        >>> core(torch.randn(2, 3 * 5, 8), routes.cross2d(3, 5)).shape
        torch.Size([2, 15, 8])
    """

    def __init__(
        self,
        d_inner: int,
        num_routes: int,
        d_state: int = 16,
        dt_rank: int | str = "auto",
        d_model: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.d_inner, self.num_routes, self.d_state = d_inner, num_routes, d_state
        self.dt_rank = auto_dt_rank(d_model or d_inner) if dt_rank == "auto" else int(dt_rank)
        K, D, N, R = num_routes, d_inner, d_state, self.dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, D))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, D, R))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, D))
        self.A_logs = nn.Parameter(torch.empty(K, D, N))
        self.Ds = nn.Parameter(torch.empty(K, D))
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official Mamba/VMamba init: x_proj as nn.Linear default, dt_proj U(+-R^-0.5 * scale), A, D."""
        bound = 1.0 / math.sqrt(self.d_inner)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        std = self.dt_rank**-0.5 * self.dt_scale
        nn.init.uniform_(self.dt_projs_weight, -std, std)
        dt_bias_init_(self.dt_projs_bias, self.dt_min, self.dt_max, self.dt_init_floor)
        A_log_init_(self.A_logs)
        nn.init.ones_(self.Ds)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-route dt (B, L, K, D), B and C (B, L, K, N) of the tokens x (B, L, D)."""
        b, L, _ = x.shape
        K, N, R = self.num_routes, self.d_state, self.dt_rank
        x_dbl = F.linear(x, self.x_proj_weight.reshape(-1, self.d_inner).to(x.dtype))  # (B, L, K*(R+2N))
        dt = lowrank_dt(x_dbl, self.dt_projs_weight, N)
        x_dbl = x_dbl.view(b, L, K, R + 2 * N)
        return dt, x_dbl[..., R : R + N].contiguous(), x_dbl[..., R + N :].contiguous()

    def forward(self, x: torch.Tensor, route: torch.Tensor, merge: str = "sum") -> torch.Tensor:
        if route.shape[0] != self.num_routes:
            raise ValueError(
                f"route has {route.shape[0]} routes but this SSMCore was built with num_routes={self.num_routes}"
            )
        x = x.contiguous()
        dt, Bs, Cs = self.project(x)
        # NOTE: the operator computes in fp32 (fp64 for fp64 inputs) and accepts mixed dtypes, so the
        # parameters A, D and dt_bias stay at least fp32 under autocast while x, dt, B, C are bf16/fp16.
        pdt = torch.promote_types(self.A_logs.dtype, torch.float32)
        A = (-torch.exp(self.A_logs.to(pdt))).contiguous()
        return selective_scan(
            x, dt, A, Bs, Cs,
            self.Ds.to(pdt).contiguous(), self.dt_projs_bias.to(pdt).contiguous(),
            route=_routes.to_device(route, x.device), merge=merge, dt_softplus=True,
        )

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, routes={self.num_routes}, d_state={self.d_state}, dt_rank={self.dt_rank}"
