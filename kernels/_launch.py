"""Launching Triton kernels with less host time per call.

``fn[grid](*args, **meta)`` runs Triton's Python launch path on every call: it binds the arguments,
computes their specialization, builds a cache key, reads its knobs, fetches the device and stream and
only then calls the compiled kernel's launcher. On the H100 host that took 23-30 us per launch of
the scan's kernels against 5-8 us for the launcher alone (benchmarks/RESULTS.md, session 17), and a
small scan's forward + backward makes 11 launches: at S3 (1024 x 1024, batch 1) the host, not the
GPU, set the pace.

``launch(fn, grid, *args, **meta)`` does what ``fn[grid]`` does, with a cache in front of it. The
first call of a (kernel, device, argument specialization, meta) goes through Triton, which compiles
if needed and returns the compiled kernel; later calls with the same key call that kernel's
launcher directly, the way Triton's own ``CompiledKernel.__getitem__`` runner does.

The key holds what Triton specializes a kernel on (``_arg_key``): for a tensor its dtype and whether
its address is 16-byte aligned; for an int whether it is 1, whether it is a multiple of 16 and
whether it fits 32 or 64 bits; bools and floats by type. Two calls with equal keys therefore get
the same compiled kernel from Triton, and ``tests/kernels/test_launch.py`` checks that against
Triton's own binder. Anything else (another argument type, a launch hook such as a profiler's,
Triton's interpreter) takes Triton's path. Triton's debug and instrumentation knobs are read when a key is first seen, not on
every launch. ``MAMBA_DENSE_TRITON_LAUNCH=jit`` turns the cache off.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JIT
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    triton = None

FAST = os.environ.get("MAMBA_DENSE_TRITON_LAUNCH", "fast") != "jit"

_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS: dict = {}


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)`` for the knobs the scan reads on every call (about 30 reads
    per forward + backward). ``os.environ.get`` goes through ``Mapping.get`` and encodes the key on
    each read (about 1 us); this looks the encoded key up in ``os.environ``'s own table, which every
    write through ``os.environ`` (``monkeypatch.setenv`` included) updates, so a changed variable is
    seen on the next call, as before."""
    if not isinstance(_ENV_DATA, dict) or os.name != "posix":
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    v = _ENV_DATA.get(key)
    return default if v is None else os.fsdecode(v)


def env_snapshot(names: tuple) -> tuple:
    """The raw values of the environment variables names (None where unset), for cache keys: one C-level
    pass over os.environ's table instead of a getenv() per name."""
    if not isinstance(_ENV_DATA, dict) or os.name != "posix":
        return tuple(os.environ.get(n) for n in names)
    keys = _ENV_KEYS.get(names)
    if keys is None:
        keys = _ENV_KEYS[names] = tuple(os.fsencode(n) for n in names)
    return tuple(map(_ENV_DATA.get, keys))


_I32 = 2**31
_I64 = 2**63
_SLOW = object()  # cache value: this key always takes Triton's path
_CACHE: dict = {}
_KEEP: dict = {}  # id -> kernel: an id in a key stays that kernel's


def _arg_key(a):
    """What Triton's specialization sees of one runtime argument (None: not cacheable)."""
    t = type(a)
    if t is int:
        if a == 1:
            return -1
        return (a & 15 == 0) if -_I32 <= a < _I32 else (2 + (a & 15 == 0) if -_I64 <= a < _I64 else 4)
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if t is bool:
        return ("b", a)  # Triton: i1, not specialized on its value; keyed on it anyway
    if t is float:
        return "f"
    return None


def _args_key(args):
    """The key of a launch's runtime arguments (None: not cacheable). The common case (ints and
    tensors) in one comprehension; it runs on every launch (about 3.5 us for 23 arguments here)."""
    try:
        keys = tuple([
            (-1 if a == 1 else ((a & 15 == 0) if -_I32 <= a < _I32 else None)) if a.__class__ is int
            else (a.dtype, a.data_ptr() & 15 == 0)
            for a in args
        ])
        if None not in keys:
            return keys
    except (AttributeError, TypeError):  # another type (bool, float, ...): the detailed path
        pass
    keys = tuple(_arg_key(a) for a in args)
    return None if None in keys else keys


def _hook_active(h) -> bool:
    # triton 3.6 / 3.8 hold the hooks in (usually empty) HookChain objects; anything else set counts
    if h is None:
        return False
    calls = getattr(h, "calls", None)
    return calls is None or len(calls) > 0


def _hooks_set() -> bool:
    rt = triton.knobs.runtime
    return _hook_active(rt.launch_enter_hook) or _hook_active(rt.launch_exit_hook)


def launch(fn, grid, *args, **meta):
    """``fn[grid](*args, **meta)``: ``args`` are the kernel's runtime arguments in order,
    ``meta`` its constexprs (by name) and launch options (num_warps, maxnreg, ...).
    Returns the cache entry (compiled kernel, constexpr tail) the launch used or stored, or None where
    it took Triton's path; ``run_entry`` launches such an entry again without the key."""
    if not FAST or triton is None or not isinstance(fn, _JIT) or _hooks_set():
        fn[grid](*args, **meta)
        return None
    keys = _args_key(args)
    if keys is None:
        fn[grid](*args, **meta)
        return None
    device = _driver.active.get_current_device()
    key = (id(fn), device, keys, tuple(meta.items()))  # id: JITFunction's __hash__ is Python code
    hit = _CACHE.get(key)
    if hit is None:
        ck = fn[grid](*args, **meta)
        hit = _CACHE[key] = _entry(fn, ck, len(args), meta)
        _KEEP[id(fn)] = fn
        return None if hit is _SLOW else hit
    if hit is _SLOW:
        fn[grid](*args, **meta)
        return None
    run_entry(hit, grid, args, device)
    return hit


def run_entry(entry, grid, args, device=None):
    """Launch a cache entry of launch() (compiled kernel, constexpr tail) with runtime arguments args
    on the current stream of device (default: the current device). The caller vouches that args
    specialize as the ones the entry was made for (same dtypes, alignment and integer classes)."""
    ck, tail = entry
    if device is None:
        device = _driver.active.get_current_device()
    ck.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
           _driver.active.get_current_stream(device), ck.function, ck.packed_metadata, None, None, None, *args, *tail)


def _entry(fn, ck, n_args: int, meta: dict):
    """(compiled kernel, constexpr values after the runtime arguments in signature order), or _SLOW
    where the launch did not return a compiled kernel (Triton's interpreter) or the signature is
    not what launch() assumes."""
    if not all(hasattr(ck, a) for a in ("run", "function", "packed_metadata")):
        return _SLOW
    params = getattr(fn, "params", None)
    if params is None or len(params) < n_args:
        return _SLOW
    tail = []
    for p in params[n_args:]:
        if not p.is_constexpr:
            return _SLOW  # a runtime argument passed by name
        if p.name in meta:
            tail.append(meta[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            return _SLOW
    if any(p.is_constexpr for p in params[:n_args]):
        return _SLOW  # a constexpr passed by position
    ck.run  # noqa: B018 - loads the module (first access initializes the handles)
    return ck, tuple(tail)


def clear_cache():
    """Forget the cached kernels (tests)."""
    _CACHE.clear()
    _KEEP.clear()
