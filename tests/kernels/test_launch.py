"""kernels/_launch.py: the launch cache must pick exactly the compiled kernel Triton would pick.

The cache keys a launch on what Triton specializes a kernel on. The first test checks that claim
against Triton's own argument binder (the function ``JITFunction.run`` calls), on CPU tensors, so it
runs in CI: whenever two argument lists get the same cache key, Triton's binder must produce the
same specialization for them. On a GPU the second test launches through the cache, hits it, and
checks the results against Triton's own launch, with aligned and misaligned pointers.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
import triton
import triton.language as tl

from mamba_dense.kernels import _launch


def _copy_scale(x_ptr, y_ptr, n, stride, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(x_ptr + offs * stride, mask=m, other=0.0)
    if FLAG:
        v = v + 1.0
    tl.store(y_ptr + offs, v * scale, mask=m)


def _binder():
    """Triton's binder for _copy_scale, as JITFunction.run builds it (internal API of triton 3.x)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = JITFunction(_copy_scale)
    return create_function_from_signature(fn.signature, fn.params, CUDABackend(GPUTarget("cuda", 90, 32)))


INTS = [0, 1, -1, 2, 15, 16, 17, 32, 48, 1000, 1024, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -2**31, -2**31 - 1,
        2**40, 2**40 + 3, -16]


def test_equal_keys_mean_equal_triton_specialization():
    binder = _binder()
    base = {dt: torch.zeros(64, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    tensors = []
    for dt, t in base.items():
        for off in (0, 1, 2, 4, 8, 16):  # element offsets: 16-byte aligned or not, by dtype
            tensors.append(t[off:])
    rng = random.Random(0)
    groups: dict = {}
    n = 0
    for x, y in itertools.product(tensors, tensors[::3]):
        for _ in range(12):
            n_, stride = rng.choice(INTS), rng.choice(INTS)
            scale = rng.choice([0.5, 1.0, 2.0])
            args = (x, y, n_, stride, scale)
            key = _launch._args_key(args)
            _bound, spec, _opts = binder(*args, BLOCK=128)
            groups.setdefault(key, set()).add(repr(spec))
            n += 1
    assert n > 1000 and len(groups) > 50  # many argument lists, many distinct keys
    clash = {k: v for k, v in groups.items() if len(v) > 1}
    assert not clash, f"one cache key, several Triton specializations: {clash}"
    # and the keys are not coarser than needed: most distinct keys give distinct specializations
    assert len({next(iter(v)) for v in groups.values()}) > 50


def test_keys_separate_what_triton_separates():
    # the converse on the cases that matter: 1 vs other ints, multiples of 16, int sizes, alignment
    def k(a):
        return _launch._args_key((a,))

    assert k(1) != k(17) and k(16) != k(17) and k(2**31) != k(2**31 - 16) and k(0) == k(16)
    assert k(2**31) != k(2**31 + 8) and k(2**40) != k(2**64) and k(-1) != k(1)
    t = torch.zeros(8)
    assert k(t) != k(t[1:]) and k(t) == k(t[4:]) and k(t) != k(t.to(torch.bfloat16))
    assert k(torch.nn.Parameter(t)) == k(t)
    assert k(True) != k(False) and k(True) != k(1) and k(0.5) == k(2.0)
    assert _launch._args_key((t, object())) is None  # not cacheable: Triton's own path


def test_launch_hooks_take_tritons_path():
    """A launch hook (a profiler's) must see every launch: the cache steps aside while one is set."""
    chain = triton.knobs.runtime.launch_enter_hook
    assert not _launch._hooks_set()  # triton keeps empty hook chains by default

    def hook(metadata):
        pass

    chain.add(hook)
    try:
        assert _launch._hooks_set()
    finally:
        chain.remove(hook)
    assert not _launch._hooks_set()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches compiled kernels (a GPU)")
def test_cached_launch_matches_triton_launch(monkeypatch):
    fn = triton.jit(_copy_scale)
    _launch.clear_cache()
    dev = "cuda"
    src = torch.randn(4096 + 8, device=dev)
    for off, n, stride, flag in [(0, 4096, 1, False), (0, 4096, 1, False), (1, 4000, 1, False), (0, 1000, 2, True),
                                 (1, 1000, 2, True), (0, 4096, 1, False), (3, 17, 1, True)]:
        x = src[off:]
        BLOCK = 256
        grid = (triton.cdiv(n, BLOCK),)
        want = torch.full((n,), float("nan"), device=dev)
        got = torch.full((n,), float("nan"), device=dev)
        fn[grid](x, want, n, stride, 1.5, BLOCK=BLOCK, FLAG=flag)
        _launch.launch(fn, grid, x, got, n, stride, 1.5, BLOCK=BLOCK, FLAG=flag, num_warps=4)
        torch.cuda.synchronize()
        assert torch.equal(got, want) and not got.isnan().any()
    entries = [v for key, v in _launch._CACHE.items() if key[0] == id(fn)]
    # (aligned, 4096, 1), (misaligned, 4000, 1), (aligned, 1000, 2, FLAG), (misaligned, ...), (odd n 17, misaligned)
    assert len(entries) == 5 and all(v is not _launch._SLOW for v in entries)
    # the default of FLAG is filled in on a cache hit
    got = torch.full((64,), float("nan"), device=dev)
    for _ in range(2):
        _launch.launch(fn, (1,), src, got, 64, 1, 2.0, BLOCK=64)
    torch.cuda.synchronize()
    assert torch.equal(got, src[:64] * 2.0)


def test_getenv_follows_os_environ(monkeypatch):
    """getenv (the scan's per-call knob reader) sees every write through os.environ, as
    os.environ.get does: set, changed, removed, and defaults for unset names."""
    name = "MAMBA_DENSE_TEST_GETENV_KNOB"
    monkeypatch.delenv(name, raising=False)
    assert _launch.getenv(name) is None and _launch.getenv(name, "d") == "d"
    monkeypatch.setenv(name, "1")
    assert _launch.getenv(name) == os.environ.get(name) == "1"
    os.environ[name] = "pairs-\u00e9"  # non-ASCII value: decoded as os.environ decodes it
    assert _launch.getenv(name) == os.environ.get(name) == "pairs-\u00e9"
    del os.environ[name]
    assert _launch.getenv(name, "x") == "x"
