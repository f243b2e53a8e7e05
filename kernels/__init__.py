"""The shared selective-scan operator of mamba-dense.

``selective_scan`` runs a selective state-space scan along any number of routes through the
tokens of a channels-last tensor, and merges the routes' outputs back onto the tokens:

    >>> import torch
    >>> from mamba_dense.kernels import selective_scan, routes
    >>> b, h, w, d, n = 2, 4, 5, 8, 4
    >>> route = routes.cross2d(h, w)                 # (K=4, S=h*w)
    >>> K, L = route.shape[0], h * w
    >>> x = torch.randn(b, L, d)
    >>> dt, B, C = torch.randn(b, L, K, d), torch.randn(b, L, K, n), torch.randn(b, L, K, n)
    >>> A = -torch.rand(K, d, n) - 0.1
    >>> selective_scan(x, dt, A, B, C, route=route).shape
    torch.Size([2, 20, 8])

CUDA tensors run the Triton kernels (``kernels/triton_scan.py``); CPU tensors run the pure-PyTorch
reference (``kernels/reference.py``). See ``selective_scan`` for the full contract.
"""

from __future__ import annotations

if __name__ != "mamba_dense.kernels":
    # This folder installs as mamba_dense.kernels. Imported a second time as a top-level "kernels"
    # (a checkout root on sys.path, and a library probing for Hugging Face's `kernels` package, as
    # transformers does), it would register mamba_dense::scan_fwd again, and torch.library drops the
    # first registration, leaving the first module's op dangling: a use-after-free that surfaced as
    # an intermittent "ValueError: vector::reserve" or a segfault in the next scan call.
    raise ImportError(
        f"{__path__[0]} is the package mamba_dense.kernels, not a top-level "
        f"{__name__!r}; import mamba_dense.kernels (a checkout root on sys.path makes this folder look "
        "like a top-level package)",
        name=__name__,
    )

import os

import torch

from . import routes
from .routes import _compiling
from . import _op  # noqa: F401  (registers mamba_dense::scan_fwd / scan_bwd)
from .reference import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "routes", "validate_inputs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The Triton kernels' largest state size: above it a program's tile (all N states of its channels, N / 32
# warps in the backward) needs more than the 1024 threads of a CUDA block (H100: N = 2048 failed to launch
# with Triton's OutOfResources; N = 1024 matched the fp64 reference, benchmarks/RESULTS.md, session 25).
# mamba_ssm's CUDA kernel stops at 256. The CPU reference has no such limit.
MAX_TRITON_STATE = 1024


def _dims(shape) -> str:
    """``(2, 3)`` for a shape in an error message. While ``torch.compile`` traces, sizes may be symbolic and
    Dynamo cannot turn them into text (the ValueError was lost behind its "tp_repr_impl not implemented"):
    the message then says so instead of naming them."""
    if _compiling():
        return "(sizes not shown while torch.compile traces; call the function eagerly to see them)"
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _n(v) -> str:
    """A size in an error message (see _dims)."""
    return "?" if _compiling() else str(int(v))


def _shape(t) -> str:
    return _dims(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


_RANGE_CACHE: dict = {}


def _route_facts(route: torch.Tensor) -> tuple[int, int, int]:
    """(min, max, first route row that visits a token twice or -1) of a route, cached per tensor (data
    pointer, shape, device, version): models pass the same cached route tensors every step, so the
    device sync happens once, not per call. The cache holds the route weakly (routes.cache_put): a
    strong reference kept every route ever passed alive, on the GPU too, until 4096 had piled up."""
    # NOTE: not cached where the version cannot see an edit: inference-mode tensors keep no version
    # counter, and a CPU route may be edited through .numpy(); there the check is cheap (no device sync).
    cacheable = route.device.type != "cpu" and routes.tensor_version(route) != -1
    key = routes.tensor_key(route)
    hit = routes.cache_get(_RANGE_CACHE, key, route) if cacheable else None
    if hit is None:
        rep = routes._repeats(route.sort(dim=1).values).any(1)
        first = torch.where(rep.any(), rep.to(torch.int64).argmax(), -1)
        hit = tuple(torch.stack([route.min(), route.max(), first]).tolist())
        if cacheable:
            routes.cache_put(_RANGE_CACHE, key, route, hit, limit=4096)
    return hit


def check_route_values(route: torch.Tensor, L: int) -> None:
    """Raise ValueError unless every index of the route lies in [-1, L) and no route visits a token twice.

    The kernels write each route's output at its tokens, so a repeated token would be written twice
    (the reference would add both visits): the two paths would disagree, and a route's coverage count
    would claim tokens it never visits. Cached per route tensor (_route_facts). Skipped while a CUDA
    graph is captured (no sync allowed there; the eager warm-up before the capture checks the route)."""
    if route.device.type == "meta" or (route.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi, dup = _route_facts(route)
    if lo < -1 or hi >= L:
        raise ValueError(f"route indices must lie in [-1, L) with L = {L} tokens of x, got values in [{lo}, {hi}]")
    if dup >= 0:
        row = route[dup]
        srt = row.sort().values
        tok = int(srt[1:][routes._repeats(srt)][0])
        steps = (row == tok).nonzero().flatten()[:2].tolist()
        raise ValueError(
            f"route row {dup} visits token {tok} more than once (steps {steps[0]} and {steps[1]}); each route "
            "must visit a token at most once (-1 marks a padding step); routes.check_route checks a route"
        )


def validate_inputs(x, dt, A, B, C, D, dt_bias, route, merge, out_dtype, check_values: bool = True) -> None:
    """Raise ValueError naming the argument, the shape it got and the shape it needs."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        raise ValueError(f"x must be a tensor of shape (batch, L, D) or (batch, L, K, D), got {_shape(x)}")
    batch, L, Dm = x.shape[0], x.shape[1], x.shape[-1]
    if not isinstance(route, torch.Tensor) or route.dim() != 2:
        raise ValueError(f"route must be an int64 tensor of shape (K, S), got {_shape(route)}")
    if route.dtype != torch.long:
        raise ValueError(f"route must have dtype torch.int64, got {route.dtype}")
    K = route.shape[0]
    if x.dim() == 4 and x.shape[2] != K:
        raise ValueError(
            f"x of shape (batch, L, K, D) must have K = {_n(K)} (the number of routes), got {_dims(x.shape)}"
        )
    if not isinstance(A, torch.Tensor) or A.dim() != 3:
        raise ValueError(f"A must be a tensor of shape (K, D, N) = ({_n(K)}, {_n(Dm)}, N), got {_shape(A)}")
    if A.shape[0] != K and isinstance(dt, torch.Tensor) and dt.dim() == 4 and dt.shape[2] == A.shape[0]:
        raise ValueError(
            f"route must have one row per route of the parameters: A {_dims(A.shape)} and dt {_dims(dt.shape)} "
            f"have K = {_n(A.shape[0])} routes, route {_dims(route.shape)} has {_n(K)} rows"
        )
    N = A.shape[2]
    need = {
        "dt": (dt, (batch, L, K, Dm), "(batch, L, K, D)"),
        "A": (A, (K, Dm, N), "(K, D, N)"),
        "B": (B, (batch, L, K, N), "(batch, L, K, N)"),
        "C": (C, (batch, L, K, N), "(batch, L, K, N)"),
        "D": (D, (K, Dm), "(K, D)"),
        "dt_bias": (dt_bias, (K, Dm), "(K, D)"),
    }
    for name, (t, shape, desc) in need.items():
        if t is None and name in ("D", "dt_bias"):
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {desc} = {_dims(shape)}, got {_shape(t)}")
    tensors = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "dt_bias": dt_bias, "route": route}
    for name, t in tensors.items():
        if t is None:
            continue
        if name == "route":
            if t.dtype != torch.long:
                raise ValueError(f"route must have dtype torch.int64, got {t.dtype}")
        elif t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name} (shape {_dims(t.shape)}) has unsupported dtype {t.dtype}; use float32, float16, bfloat16 "
                "or float64"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {_dims(t.stride())} for shape {_dims(t.shape)}); call .contiguous()")
        if t.device != x.device:
            raise ValueError(
                f"{name} (shape {_dims(t.shape)}) is on {t.device} but x is on {x.device}; all inputs must share one "
                "device"
            )
    if merge not in ("sum", "none"):
        raise ValueError(f"merge must be 'sum' or 'none', got {merge!r}")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be a floating dtype or None, got {out_dtype}")
    if route.numel() == 0 or x.numel() == 0 or N == 0:
        raise ValueError(
            f"empty input: x {_dims(x.shape)}, route {_dims(route.shape)}, N = {_n(N)}; every dimension must be >= 1"
        )
    if check_values:
        check_route_values(route, L)


def _triton_on_cpu(t: torch.Tensor) -> bool:
    """``MAMBA_DENSE_TRITON_CPU=1`` together with ``TRITON_INTERPRET=1`` runs the Triton kernels
    (scan, instance norm, route conv) on CPU tensors through Triton's interpreter (the tests)."""
    return t.device.type == "cpu" and os.environ.get("MAMBA_DENSE_TRITON_CPU", "0") == "1"


def _use_triton(x: torch.Tensor) -> bool:
    """CUDA (and meta, for shape inference) -> the registered Triton op; CPU -> the reference,
    unless :func:`_triton_on_cpu`."""
    return x.device.type in ("cuda", "meta") or _triton_on_cpu(x)



def selective_scan(
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
) -> torch.Tensor:
    """Selective scan along K routes through the tokens, merged in the kernel.

    Args:
        x: (batch, L, D) tokens, channels-last; or (batch, L, K, D) for a different input per route
            (e.g. after a per-direction convolution, as in Vim and SegMamba); dx is then per route.
        dt: (batch, L, K, D) step sizes before bias/softplus, one per route.
        A: (K, D, N) negative state matrices (diagonal). Used as given, not checked (a value check would
            cost a device sync per call; the layers pass A = -exp(A_logs)): A >= 0 makes the state grow.
        B, C: (batch, L, K, N) input and output projections per route.
        D: optional (K, D) skip weights; dt_bias: optional (K, D).
        route: int64 (K, S); route k visits token ``route[k, s]`` at step s; -1 is a padding step
            (a zero token: x = B = C = dt = 0, the state still decays, no output).
        merge: "sum" adds the routes' outputs at each token -> (batch, L, D);
            "none" returns them per route -> (batch, L, K, D). Tokens no route visits get 0.
        dt_softplus: apply softplus to dt + dt_bias.
        out_dtype: output dtype (default: x.dtype; pass torch.float32 for fp32 output).

    Per route k and step s with t = route[k, s]:
        delta = softplus(dt[t, k] + dt_bias[k]);  h = exp(delta * A[k]) * h + delta * B[t, k] * x[t]
        out = <C[t, k], h> + D[k] * x[t]
    State and accumulation are fp32 (fp64 for fp64 inputs) on every path.

    Returns:
        (batch, L, D) for merge="sum", (batch, L, K, D) for merge="none".
    """
    validate_inputs(x, dt, A, B, C, D, dt_bias, route, merge, out_dtype, check_values=not _compiling())
    if _use_triton(x):
        if A.shape[2] > MAX_TRITON_STATE:
            raise ValueError(
                f"A has shape {_dims(A.shape)}: state size N = {_n(A.shape[2])} is above the GPU kernels' limit of "
                f"{MAX_TRITON_STATE} (d_state; mamba_ssm's kernel stops at 256); use N <= {MAX_TRITON_STATE} (the CPU "
                "reference has no limit)"
            )
        return _op.selective_scan_op(x, dt, A, B, C, D, dt_bias, route, merge, dt_softplus, out_dtype)
    odt = out_dtype or x.dtype
    if _compiling():
        route = _op.checked_route(route, x.shape[1])  # the value check at run time (see checked_route)
    # The reference computes in fp32/fp64 itself; keep CPU autocast from re-casting its internals.
    with torch.autocast("cpu", enabled=False):
        return selective_scan_ref(
            x, dt, A, B, C, D, dt_bias, route=route, merge=merge, dt_softplus=dt_softplus, out_dtype=odt
        )
