"""Scan routes: which token each scan visits at each step, computed from the actual shape.

A route tensor is int64 of shape (K, S): route ``k`` visits token ``route[k, s]`` at step ``s``
(tokens are numbered row-major over the feature map, ``t = i * W + j`` in 2D and
``t = (d * H + i) * W + j`` in 3D); ``-1`` marks a padding step, which the scan treats as a
zero token whose output is dropped. Every builder takes the real grid size, so the same
model runs at any resolution; none is tied to one input size.

Builders return tensors on the CPU; :func:`to_device` caches device copies.

Example:
    >>> r = cross2d(2, 3)
    >>> r.tolist()
    [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
"""

from __future__ import annotations

import functools
import numbers
import weakref

import torch

__all__ = [
    "raster",
    "column",
    "flip",
    "stack",
    "cross2d",
    "window",
    "localmamba",
    "LOCALMAMBA_DIRECTIONS",
    "bidirectional",
    "axes3d",
    "segmamba3d",
    "with_registers",
    "inverse",
    "check_route",
    "to_device",
    "device_route",
    "source_key",
    "built_route",
]


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - old torch
        return False


def _call_on_cpu(fn, args, kwargs):
    # outside inference mode too: routes are cached, and a route first built under
    # ``torch.inference_mode`` (Lightning's validation) would be an inference tensor that a later
    # training step cannot save for backward
    with torch.device("cpu"), torch.inference_mode(False):
        return fn(*args, **dict(kwargs))


# A builder called inside compiled code runs eagerly (a graph break): Dynamo cannot enter the
# ``torch.device`` context. The encoders never do this; they go through ``device_route``.
# (``assume_constant_result`` would avoid the break but fails in torch 2.11's Dynamo when a graph
# holds several calls.)
_call_on_cpu_eager = torch.compiler.disable(_call_on_cpu)


def _on_cpu(fn):
    """Build routes on the CPU even inside a ``torch.device("meta")`` (or CUDA) default-device
    context: the builders are cached, and a cached meta route would poison later real runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _compiling():
            return _call_on_cpu_eager(fn, args, tuple(kwargs.items()))
        return _call_on_cpu(fn, args, tuple(kwargs.items()))

    return wrapper


def _hashable(v):
    return tuple(_hashable(e) for e in v) if isinstance(v, (list, tuple)) else v


def _typed(v):
    """A cache key part with the types in it, so that 2.0 or True (equal to 2 and 1, with the same hash)
    reach the builder and its argument checks instead of the route cached for 2 or 1."""
    return tuple(_typed(e) for e in v) if isinstance(v, tuple) else (type(v).__name__, v)


def cached_route(maxsize: int):
    """Cache a route builder's result per arguments (lists count as tuples), like functools.lru_cache,
    except that a cached route edited in place by a caller (its version moved) is rebuilt, not handed
    to the next caller: the encoders and other callers of the same builder never see another caller's
    edits. The same object comes back while it is unedited, so the scan's per-route caches keep hitting."""

    def deco(fn):
        cache: dict = {}

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            args, kwargs = _hashable(args), {k: _hashable(v) for k, v in kwargs.items()}
            key = (_typed(args), tuple(sorted((k, _typed(v)) for k, v in kwargs.items())))
            hit = cache.get(key)
            if hit is None or tensor_version(hit[0]) != hit[1]:
                if len(cache) >= maxsize:
                    cache.clear()
                route = fn(*args, **kwargs)
                hit = cache[key] = (route, tensor_version(route))
            return hit[0]

        wrapper.cache_clear = cache.clear
        return wrapper

    return deco


def _check_grid(*dims: int) -> None:
    for d in dims:  # any integer type (numpy's too), not bools
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1:
            raise ValueError(f"grid sizes must be positive ints, got {dims}")


@_on_cpu
def raster(h: int, w: int = 1) -> torch.Tensor:
    """Row-major order over an (h, w) grid (or a 1D sequence of h tokens): shape (h*w,)."""
    _check_grid(h, w)
    return torch.arange(h * w, dtype=torch.long)


@_on_cpu
def column(h: int, w: int) -> torch.Tensor:
    """Column-major order over an (h, w) grid: top to bottom, then left to right."""
    _check_grid(h, w)
    return torch.arange(h * w, dtype=torch.long).view(h, w).t().reshape(-1)


def flip(route: torch.Tensor) -> torch.Tensor:
    """The same steps in reverse order (padding steps included)."""
    return route.flip(-1)


def stack(*routes: torch.Tensor) -> torch.Tensor:
    """Stack 1D routes of equal length into a (K, S) route tensor."""
    lens = {int(r.numel()) for r in routes}
    if len(lens) != 1:
        raise ValueError(f"routes to stack must have equal length, got lengths {sorted(lens)}")
    return torch.stack([r.reshape(-1) for r in routes]).to(torch.long).contiguous()


@cached_route(maxsize=256)
@_on_cpu
def cross2d(h: int, w: int) -> torch.Tensor:
    """VMamba's 4-way cross scan: row-major, column-major and both reversed, shape (4, h*w)."""
    r, c = raster(h, w), column(h, w)
    return stack(r, c, flip(r), flip(c))


@_on_cpu
def window(h: int, w: int, size: int, column_first: bool = False) -> torch.Tensor:
    """LocalMamba windowed scan.

    The grid is zero-padded at the bottom/right to multiples of ``size``; windows are visited in
    row-major order (column-major with ``column_first``) and the tokens inside each window in the
    same order. Padded positions stay in the sequence as ``-1`` steps (the scan treats them as
    zero tokens), exactly as LocalMamba's padded windows do. Length: ceil(h/size)*ceil(w/size)*size^2.
    """
    _check_grid(h, w, size)
    hp, wp = -(-h // size) * size, -(-w // size) * size
    ii = torch.arange(hp)[:, None].expand(hp, wp)
    jj = torch.arange(wp)[None, :].expand(hp, wp)
    tok = torch.where((ii < h) & (jj < w), ii * w + jj, torch.full_like(ii, -1))
    g = tok.view(hp // size, size, wp // size, size)  # (Hg, wi, Wg, wj)
    if column_first:
        g = g.permute(2, 0, 3, 1)  # (Wg, Hg, wj, wi)
    else:
        g = g.permute(0, 2, 1, 3)  # (Hg, Wg, wi, wj)
    return g.reshape(-1).contiguous()


LOCALMAMBA_DIRECTIONS = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")


@_on_cpu
def _localmamba_one(name: str, h: int, w: int) -> torch.Tensor:
    base, _, fl = name.partition("_")
    if fl not in ("", "flip") or base not in ("h", "v", "w2", "w7"):
        raise ValueError(f"unknown LocalMamba direction {name!r}; expected one of {LOCALMAMBA_DIRECTIONS}")
    if base == "h":
        r = raster(h, w)
    elif base == "v":
        r = column(h, w)
    else:
        r = window(h, w, int(base[1:]))
    return flip(r) if fl else r


@cached_route(maxsize=512)
@_on_cpu
def localmamba(h: int, w: int, directions: tuple[str, ...]) -> torch.Tensor:
    """Routes for LocalMamba directions (``h``, ``v``, ``w2``, ``w7``, each optionally ``_flip``).

    Windowed routes are longer than h*w when the grid is not a multiple of the window; all routes
    are padded with trailing ``-1`` steps to the longest one.
    """
    if isinstance(directions, str) or not directions:
        raise ValueError(f"directions must be a non-empty sequence of LocalMamba directions (e.g. ('h', 'v_flip', "
                         f"'w7')), got {directions!r}")
    rs = [_localmamba_one(d, h, w) for d in directions]
    S = max(r.numel() for r in rs)
    rs = [torch.cat([r, torch.full((S - r.numel(),), -1, dtype=torch.long)]) for r in rs]
    return stack(*rs)


@_on_cpu
def bidirectional(n: int) -> torch.Tensor:
    """Vim's forward and backward scans over n tokens, shape (2, n)."""
    r = raster(n)
    return stack(r, flip(r))


@_on_cpu
def _grid3d(d: int, h: int, w: int) -> torch.Tensor:
    _check_grid(d, h, w)
    return torch.arange(d * h * w, dtype=torch.long).view(d, h, w)


@_on_cpu
def axes3d(d: int, h: int, w: int, reverse: bool = True) -> torch.Tensor:
    """3D orders with each axis fastest (W, H, D), and, with ``reverse``, each reversed: (6 or 3, d*h*w)."""
    g = _grid3d(d, h, w)
    rs = [g.reshape(-1), g.permute(0, 2, 1).reshape(-1), g.permute(1, 2, 0).reshape(-1)]
    if reverse:
        rs += [flip(r) for r in rs]
    return stack(*rs)


@_on_cpu
def segmamba3d(d: int, h: int, w: int) -> torch.Tensor:
    """SegMamba's tri-oriented scan: forward raster, reversed raster, inter-slice (depth fastest)."""
    g = _grid3d(d, h, w)
    fwd = g.reshape(-1)
    return stack(fwd, flip(fwd), g.permute(1, 2, 0).reshape(-1))


def with_registers(route: torch.Tensor, num_tokens: int, num_registers: int, placement: str = "even") -> torch.Tensor:
    """Splice register tokens into each route (Mamba(R)).

    Registers are tokens ``num_tokens .. num_tokens + R - 1`` (appended after the image tokens in
    the token tensor). In every route of S steps, register ``r`` is visited right before step
    ``p_r``:

    - ``placement="even"``: ``p_r = round((r + 1) * S / (R + 1))``, evenly spaced through the sequence;
      none is at an end while S / (R + 1) > 1/2 (e.g. R = 12 registers on a 1 x 1 last stage put some
      first and last);
    - ``placement="mambar"``: ``p_r = (r + 1) * (S // (R + 1))``, the official Mamba(R) layout
      (``get_cls_idx``): groups of S // (R + 1) tokens, each followed by a register, then the rest
      (all registers first when S < R + 1).

    A flipped route is handled by splicing into the un-flipped order: use
    ``flip(with_registers(route, ...))`` when you want mirrored positions.
    """
    if route.dim() == 1:
        return with_registers(route[None], num_tokens, num_registers, placement)[0]
    if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 0:
        raise ValueError(f"num_registers must be an int >= 0, got {num_registers!r}")
    if placement not in ("even", "mambar"):
        raise ValueError(f"placement must be 'even' or 'mambar', got {placement!r}")
    if route.numel() and int(route.max()) >= num_tokens:
        raise ValueError(f"route visits token {int(route.max())}, but num_tokens={num_tokens}: the registers "
                         f"(tokens num_tokens ..) would repeat route tokens; pass the route's number of tokens")
    if num_registers == 0:
        return route
    K, S = route.shape
    R = num_registers
    if placement == "even":
        pos = [round((r + 1) * S / (R + 1)) for r in range(R)]
    else:
        pos = [(r + 1) * (S // (R + 1)) for r in range(R)]
    parts, prev = [], 0
    for r, p in enumerate(pos):
        parts.append(route[:, prev:p])
        parts.append(torch.full((K, 1), num_tokens + r, dtype=torch.long, device=route.device))
        prev = p
    parts.append(route[:, prev:])
    return torch.cat(parts, dim=1).contiguous()


def inverse(route: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inverse permutation: ``inv[k, t]`` is the step at which route k visits token t (-1 if never).

    Works for any grid shape (H != W included) and ignores padding steps.
    """
    if route.dim() == 1:
        return inverse(route[None], num_tokens)[0]
    check_route(route, num_tokens)  # indices in [-1, num_tokens), no token visited twice
    K, S = route.shape
    inv = torch.full((K, num_tokens), -1, dtype=torch.long, device=route.device)
    steps = torch.arange(S, device=route.device).expand(K, S)
    valid = route >= 0
    kk = torch.arange(K, device=route.device)[:, None].expand(K, S)
    inv[kk[valid], route[valid]] = steps[valid]
    return inv


def _repeats(srt: torch.Tensor) -> torch.Tensor:
    """Where a route sorted along its last axis repeats a token, (..., S - 1) (padding steps -1 may repeat)."""
    return (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)


def check_route(route: torch.Tensor, num_tokens: int) -> None:
    """Raise ValueError if a route is malformed (wrong rank/dtype, index outside [-1, L), repeats)."""
    if not isinstance(route, torch.Tensor) or route.dim() != 2:
        shape = tuple(route.shape) if isinstance(route, torch.Tensor) else type(route).__name__
        raise ValueError(f"route must be an int64 tensor of shape (K, S), got {shape}")
    if route.dtype != torch.long:
        raise ValueError(f"route must have dtype torch.int64, got {route.dtype}")
    if route.numel() == 0:
        raise ValueError(f"route must have K >= 1 and S >= 1, got shape {tuple(route.shape)}")
    lo, hi = int(route.min()), int(route.max())
    if lo < -1 or hi >= num_tokens:
        raise ValueError(
            f"route indices must lie in [-1, L) with L = {num_tokens} tokens, got values in [{lo}, {hi}]"
        )
    srt, _ = torch.sort(route, dim=1)
    if bool(_repeats(srt).any()):
        raise ValueError("each route must visit a token at most once (a repeated index was found)")


def tensor_version(t: torch.Tensor) -> int:
    """In-place modification counter; -1 for inference-mode tensors (they keep none)."""
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return -1


def tensor_key(t: torch.Tensor, *extra) -> tuple:
    """A cache key for facts about the values of tensor t: its memory, shape, device and version (an
    in-place change makes a new key)."""
    return (t.data_ptr(), tuple(t.shape), str(t.device), tensor_version(t), *extra)


def cache_get(cache: dict, key: tuple, t: torch.Tensor):
    """The value cached for tensor t under key (see cache_put), or None."""
    hit = cache.get(key)
    return hit[1] if hit is not None and hit[0]() is t else None


def cache_put(cache: dict, key: tuple, t: torch.Tensor, value, limit: int):
    """Cache value for tensor t under key, holding t by a weak reference: a hit must be this very
    tensor (not another one that reuses a freed tensor's memory), and the entry goes when t is freed,
    so a caller passing a fresh route per call does not keep them all alive (with their device copies)."""
    if len(cache) >= limit:
        cache.clear()

    def forget(ref, cache=cache, key=key):
        if cache.get(key, (None,))[0] is ref:  # unless the entry was replaced meanwhile
            cache.pop(key, None)  # (or cleared: the callback may run on another thread)

    cache[key] = (weakref.ref(t, forget), value)
    return value


_DEVICE_CACHE: dict = {}


def to_device(route: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Device copy of a (CPU) route, cached per route tensor (and its version) so encoders don't
    re-upload every step."""
    device = torch.device(device)
    if route.device == device:
        return route
    key = tensor_key(route, str(device))
    hit = cache_get(_DEVICE_CACHE, key, route)
    if hit is not None:
        return hit
    with torch.inference_mode(False):  # cached: must stay usable by later autograd steps
        moved = route.to(device, non_blocking=False)
    return cache_put(_DEVICE_CACHE, key, route, moved, limit=1024)


_SOURCES: dict[str, object] = {}
_SOURCE_KEYS: dict[int, str] = {}
_BUILT: dict[tuple, torch.Tensor] = {}


def source_key(fn) -> str:
    """A stable string key for a route builder (function or ``functools.partial``), for
    :func:`device_route`. Modules call it once when they set their builder; the registry keeps the
    builder alive, so the key never points at another object."""
    key = _SOURCE_KEYS.get(id(fn))
    if key is None or _SOURCES[key] is not fn:
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", type(fn).__name__)
        key = f"{name}#{len(_SOURCES)}"
        _SOURCES[key] = fn
        _SOURCE_KEYS[id(fn)] = key
    return key


def built_route(key: str, *grid: int, registers: int = 0) -> torch.Tensor:
    """The CPU route of builder ``key`` (see :func:`source_key`) for ``grid``, with ``registers``
    register tokens spliced in after the map tokens (:func:`with_registers`); cached."""
    ck = (key, grid, registers)
    hit = _BUILT.get(ck)
    if hit is None:
        if len(_BUILT) > 512:
            _BUILT.clear()
        with torch.device("cpu"), torch.inference_mode(False):  # see _call_on_cpu
            # a private copy: builders cache their results and hand the same object to every caller
            hit = _SOURCES[key](*grid).clone()
            if registers:
                n = 1
                for g in grid:
                    n *= g
                hit = with_registers(hit, n, registers)
        _BUILT[ck] = hit
    return hit


_DEVICE_ROUTES: dict[tuple, torch.Tensor] = {}


def _device_route(key, grid, registers, device):
    ck = (key, grid, registers, str(device))
    hit = _DEVICE_ROUTES.get(ck)
    if hit is None:
        if len(_DEVICE_ROUTES) > 512:
            _DEVICE_ROUTES.clear()
        hit = _DEVICE_ROUTES[ck] = to_device(built_route(key, *grid, registers=registers), device)
        if hit.is_cuda:
            # a static address for CUDA graphs (torch.compile mode="reduce-overhead"): the captured
            # graph reads this cached tensor instead of a per-replay copy, and the scan's per-route
            # caches (coverage, range) keep hitting
            import torch._dynamo

            torch._dynamo.mark_static_address(hit, guard=False)
    return hit


@torch.library.custom_op("mamba_dense::device_route", mutates_args=())
def _device_route_op(key: str, grid: list[int], registers: int, device: torch.device) -> torch.Tensor:
    # a fresh tensor: the compiled graph owns its outputs (the scan checks this copy's coverage)
    return _device_route(key, tuple(grid), registers, device).clone()


@_device_route_op.register_fake
def _(key, grid, registers, device):
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # NOTE: a route's length depends on the grid in builder-specific ways (padded windows, ...), so
    # symbolic sizes (torch.compile's automatic dynamic shapes) are made concrete: int() of a SymInt
    # guards on its value (the graph is specialized to this size; another size recompiles)
    grid = [int(g) for g in grid]
    with unset_fake_temporarily():
        shape = tuple(built_route(key, *grid, registers=registers).shape)
    return torch.empty(shape, dtype=torch.long, device=device)


def device_route(key: str, *grid: int, registers: int = 0, device: torch.device | str) -> torch.Tensor:
    """:func:`built_route` on ``device``.

    In eager mode the route and its device copy are cached. Under ``torch.compile`` (no graph
    break either way): a route already cached by an eager call at this size enters the graph as
    that same tensor (run one eager step before compiling); otherwise the lookup is the opaque op
    ``mamba_dense::device_route`` (string and int arguments), which returns a fresh device copy per
    call, and the scan then checks that copy's coverage with a device sync per call.
    """
    device = torch.device(device)
    if _compiling():
        hit = _DEVICE_ROUTES.get((key, tuple(grid), registers, str(device)))
        if hit is not None:
            # seen in eager mode (e.g. a warm-up step): the cached tensor becomes a graph input, the
            # same object every call, so the scan's per-route caches hit and nothing is copied
            return hit
        return _device_route_op(key, list(grid), registers, device)
    return _device_route(key, tuple(grid), registers, device)
