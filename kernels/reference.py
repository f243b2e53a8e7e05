"""Pure-PyTorch selective scan over arbitrary routes: the CPU path and the test oracle.

Same contract as :func:`mamba_dense.kernels.selective_scan` (see its docstring). The scan is
evaluated chunk by chunk: a short loop over the few steps of a chunk, vectorized over all chunks
at once, then a log-depth (Hillis-Steele) scan that carries states across chunks, so there is no
Python loop over the tokens of a sequence.
Works in float64 (used as the oracle in tests) and is differentiable with plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "gather_routes"]


def _hillis_steele(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of the affine maps h -> a*h + b along ``dim`` (log2(n) passes)."""
    n = a.shape[dim]
    off = 1
    while off < n:
        a_prev = a.narrow(dim, 0, n - off)
        b_prev = b.narrow(dim, 0, n - off)
        a_cur = a.narrow(dim, off, n - off)
        b_cur = b.narrow(dim, off, n - off)
        b = torch.cat([b.narrow(dim, 0, off), a_cur * b_prev + b_cur], dim=dim)
        a = torch.cat([a.narrow(dim, 0, off), a_cur * a_prev], dim=dim)
        off *= 2
    return a, b


def _chunk_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h -> a*h + b along a short ``dim`` (the steps of a chunk), step by step
    but vectorized over every chunk; returns (cumulative decay, state). Faster than the log-depth
    scan on CPU for chunks of ~8 steps (fewer full-size copies, forward and backward)."""
    hs, ps = [], []
    h = p = None
    for t in range(a.shape[dim]):
        at, bt = a.select(dim, t), b.select(dim, t)
        h = bt if h is None else at * h + bt
        p = at if p is None else at * p
        hs.append(h)
        ps.append(p)
    return torch.stack(ps, dim), torch.stack(hs, dim)


def gather_routes(t: torch.Tensor, route: torch.Tensor, per_route: bool) -> torch.Tensor:
    """Gather tokens along ``route``; padding steps (-1) read zeros.

    t: (batch, L, F) if not per_route, (batch, L, K, F) if per_route. Returns (batch, K, S, F).
    """
    K, S = route.shape
    valid = (route >= 0).to(t.dtype)  # (K, S)
    idx = route.clamp(min=0)
    if per_route:
        kk = torch.arange(K, device=t.device)[:, None].expand(K, S)
        g = t[:, idx, kk]  # (batch, K, S, F)
    else:
        g = t[:, idx]  # (batch, K, S, F)
    return g * valid[None, :, :, None]


def selective_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    *,
    route: torch.Tensor,
    merge: str = "sum",
    dt_softplus: bool = True,
    out_dtype: torch.dtype | None = None,
    chunk: int = 8,
) -> torch.Tensor:
    """Reference selective scan. Shapes as in :func:`mamba_dense.kernels.selective_scan`.

    No input checks (the tests call it on what they built): :func:`~mamba_dense.kernels.selective_scan`
    validates its inputs and then runs this on the CPU. A route that visits a token twice is not refused
    here; both visits' outputs are added at that token."""
    batch, L, Dm = x.shape[0], x.shape[1], x.shape[-1]
    K, S = route.shape
    N = A.shape[-1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    route = route.to(device=x.device, dtype=torch.long)
    valid = route >= 0  # (K, S)

    xs = gather_routes(x.to(cdt), route, per_route=x.dim() == 4)  # (b, K, S, D)
    dts = gather_routes(dt.to(cdt), route, per_route=True)  # (b, K, S, D)
    Bs = gather_routes(B.to(cdt), route, per_route=True)  # (b, K, S, N)
    Cs = gather_routes(C.to(cdt), route, per_route=True)  # (b, K, S, N)
    if dt_bias is not None:
        dts = dts + dt_bias.to(cdt)[None, :, None, :]
    delta = F.softplus(dts) if dt_softplus else dts

    # Pad the steps to a multiple of the chunk with identity maps (a = 1, b = 0).
    T = max(1, min(chunk, S))
    nC = -(-S // T)
    pad = nC * T - S
    a = torch.exp(delta[..., None] * A.to(cdt)[None, :, None, :, :])  # (b, K, S, D, N)
    u = (delta * xs)[..., None] * Bs[:, :, :, None, :]  # (b, K, S, D, N)
    if pad:
        a = F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0)
        u = F.pad(u, (0, 0, 0, 0, 0, pad), value=0.0)
    a = a.reshape(batch, K, nC, T, Dm, N)
    u = u.reshape(batch, K, nC, T, Dm, N)
    a_cum, h_loc = _chunk_scan(a, u, dim=3)  # chunk-local scans
    # Carry: state entering each chunk = scan over the chunk-final maps, shifted by one chunk.
    _, h_end = _hillis_steele(a_cum[:, :, :, -1], h_loc[:, :, :, -1], dim=2)  # (b, K, nC, D, N)
    h_in = torch.cat([torch.zeros_like(h_end[:, :, :1]), h_end[:, :, :-1]], dim=2)
    h = h_loc + a_cum * h_in[:, :, :, None]
    h = h.reshape(batch, K, nC * T, Dm, N)[:, :, :S]
    y = (h * Cs[:, :, :, None, :]).sum(-1)  # (b, K, S, D)
    if D is not None:
        y = y + D.to(cdt)[None, :, None, :] * xs

    odt = out_dtype or x.dtype
    kk = torch.arange(K, device=x.device)[:, None].expand(K, S)[valid]
    tt = route[valid]
    yv = y[:, valid]  # (b, M, D) with M valid steps
    if merge == "sum":
        out = torch.zeros(batch, L, Dm, dtype=cdt, device=x.device)
        out = out.index_add(1, tt, yv)
    elif merge == "none":
        out = torch.zeros(batch, L, K, Dm, dtype=cdt, device=x.device)
        out = out.index_put((torch.arange(batch, device=x.device)[:, None], tt[None], kk[None]), yv)
    else:
        raise ValueError(f"merge must be 'sum' or 'none', got {merge!r}")
    return out.to(odt)
