"""A batch past CUDA's grid limit, on the GPU (CUDA caps a grid's second and third dimensions at
65535 programs; the scan's launches put the batch on the third).

Many small regions folded into the batch (8 x 8 windows of a 512 x 512 map at batch 16 are 65536
sequences) made every launch fail with CUDA's "invalid argument". The scan now runs such a batch in
slices (``triton_scan.MAX_GRID_YZ``); the interpreter has no grid limit, so
``test_triton_kernels.py::test_grids_stay_within_cuda_limits`` checks the slicing there with the limit
set to 3, and this file checks a real launch.
"""

import pytest
import torch

from mamba_dense.kernels import routes, selective_scan, selective_scan_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's grid limit: needs a GPU")


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite entries (an unwritten, poisoned element?)"
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("N, merge", [(1, "sum"), (16, "none")])
def test_batch_past_the_grid_limit(N, merge, monkeypatch):
    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")
    batch, h, w, Dm = 65535 + 300, 4, 4, 8
    route = routes.cross2d(h, w).cuda()
    K, L = route.shape[0], h * w
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    r = lambda *s, sc=1.0: torch.randn(*s, generator=g, device="cuda", dtype=torch.float64) * sc  # noqa: E731
    args = [r(batch, L, Dm), r(batch, L, K, Dm, sc=0.5) - 1.0, -torch.exp(r(K, Dm, N, sc=0.5)),
            r(batch, L, K, N), r(batch, L, K, N), r(K, Dm), r(K, Dm, sc=0.3)]
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        # the token inputs in dtype; the reference runs in fp64 on the same (rounded) values
        vals = [a.to(dtype).double() if i in (0, 1, 3, 4) else a.float().double() for i, a in enumerate(args)]
        ref_in = [a.clone().requires_grad_() for a in vals]
        y_ref = selective_scan_ref(*ref_in, route=route, merge=merge)
        dy = torch.randn(y_ref.shape, generator=g, device="cuda", dtype=torch.float64)
        g_ref = torch.autograd.grad(y_ref, ref_in, dy)
        ins = [a.to(dtype if i in (0, 1, 3, 4) else torch.float32).requires_grad_() for i, a in enumerate(vals)]
        y = selective_scan(*ins, route=route, merge=merge, out_dtype=torch.float32)
        grads = torch.autograd.grad(y, ins, dy.float())
        assert _rel(y, y_ref) < tol, dtype
        # the last slice (300 elements) alone: none of it left unwritten or mixed up with another slice
        assert _rel(y[65535:], y_ref[65535:]) < tol, dtype
        for name, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), grads, g_ref):
            assert _rel(a, b) < tol, (dtype, name)
