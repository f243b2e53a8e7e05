"""Element offsets past 2^31 on the GPU (issue 2: "offsets in int64 wherever products can exceed 2^31").

The kernels compute token-row offsets in int32 when every offset of a launch fits 31 bits
(``triton_scan._kernel_route``) and in int64 otherwise. Here dt has 2 x 2^20 x 4 x 320 = 2.7e9
elements (5.4 GB in bf16), so batch element 1 lives past 2^31: a 32-bit product anywhere (the
gathers, the stores, the saved states, the carry, the partial sums) would read or write batch
element 0's memory or wrap around. Batch element 1 is then run alone, where every offset fits 31 bits
(the int32 path), and the two must agree: the output and the per-token gradients of element 1, and
the parameter gradients summed over both elements against the two single runs. Outputs are poisoned
(MAMBA_DENSE_POISON=1), so an unwritten element shows up as NaN. Needs about 40 GB of GPU memory;
the CPU interpreter cannot run shapes of this size, so the test only runs on a GPU.
"""

import pytest
import torch

from mamba_dense.kernels import routes, selective_scan

BIG = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 60 * 2**30
pytestmark = [pytest.mark.skipif(not BIG, reason="needs a GPU with >= 60 GB (5.4 GB inputs past 2^31 elements)"),
              pytest.mark.usefixtures("exclusive_gpu_memory")]  # tests/conftest.py: one such test at a time


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite entries (an unwritten, poisoned element?)"
    return float((a - b).norm() / b.norm())


def test_offsets_past_2pow31_match_the_int32_path(monkeypatch):
    from mamba_dense.kernels import triton_scan as ts

    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")
    h = w = 1024
    batch, L, Dm, N = 2, h * w, 320, 1
    route = routes.cross2d(h, w).cuda()
    K = route.shape[0]
    assert batch * L * K * Dm >= 2**31 > L * K * Dm
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    r = lambda *s, sc=1.0: torch.randn(*s, generator=g, device="cuda") * sc  # noqa: E731
    x = r(batch, L, Dm).bfloat16()
    dt = (r(batch, L, K, Dm, sc=0.5) - 1.0).bfloat16()
    B, C = r(batch, L, K, N).bfloat16(), r(batch, L, K, N).bfloat16()
    A = -torch.exp(r(K, Dm, N, sc=0.5))
    Dp, bias = r(K, Dm), r(K, Dm, sc=0.3)
    dy = r(batch, L, Dm)
    assert ts._kernel_route(route, batch * L * K * Dm).dtype == torch.int64
    assert ts._kernel_route(route, L * K * Dm).dtype == torch.int32

    def run(sl):
        ins = [t[sl].detach().clone().requires_grad_() for t in (x, dt, B, C)]
        params = [p.detach().clone().requires_grad_() for p in (A, Dp, bias)]
        xx, dd, BB, CC = ins
        y = selective_scan(xx, dd, params[0], BB, CC, params[1], params[2], route=route, out_dtype=torch.float32)
        grads = torch.autograd.grad(y, ins + params, dy[sl])
        return y.detach(), grads

    y2, g2 = run(slice(0, 2))
    y_b0, g_b0 = run(slice(0, 1))
    y_b1, g_b1 = run(slice(1, 2))
    # element 1 of the big run (offsets past 2^31) against element 1 alone (int32 offsets)
    assert _rel(y2[1:], y_b1) < 1e-5
    assert _rel(y2[:1], y_b0) < 1e-5
    for name, a, b in zip(("dx", "ddt", "dB", "dC"), g2[:4], g_b1[:4]):
        assert _rel(a[1:], b) < 1e-2, name  # bf16 gradients, rounded in different chunkings
    # dA, dD, dbias: summed over both elements
    for name, a, b0, b1 in zip(("dA", "dD", "dbias"), g2[4:], g_b0[4:], g_b1[4:]):
        assert _rel(a, b0 + b1) < 1e-4, name


def test_block_sums_past_2pow31():
    """sum_blocks adds the backward's per-channel-block dB / dC partials, (n_blk, M) with n_blk x M past
    2^31 when the blocks are many and narrow (batch 8, 56 x 56, 4 routes, N = 256 in 96 one-channel
    blocks: 2.5e9 elements): block j's offset j x M must not wrap in int32 (it did, session 24: an
    illegal memory access). Sums in fp32 in block order, so equal to the same sums made by torch."""
    from mamba_dense.kernels import triton_scan as ts

    n_blk, M = 4, 600_000_000
    assert n_blk * M >= 2**31
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    part = torch.randn(n_blk, M, generator=g, device="cuda", dtype=torch.bfloat16)
    out = ts.sum_blocks(part, torch.float32)
    ref = part[0].float()
    for j in range(1, n_blk):
        ref += part[j].float()
    assert torch.equal(out, ref)
