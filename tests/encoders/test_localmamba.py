"""LocalMamba: direction lists, windowed routes on H != W, channel attention per route."""

from __future__ import annotations

import pytest
import torch

from mamba_dense.encoders.localmamba import (
    LOCALVMAMBA_SMALL_DIRECTIONS,
    LOCALVMAMBA_TINY_DIRECTIONS,
    LocalSS2D,
    LocalVMamba,
)
from mamba_dense.kernels import routes, selective_scan


def test_direction_lists_match_depths():
    assert len(LOCALVMAMBA_TINY_DIRECTIONS) == 2 + 2 + 9 + 2 == 15
    assert len(LOCALVMAMBA_SMALL_DIRECTIONS) == 2 + 2 + 27 + 2 == 33
    for d in LOCALVMAMBA_TINY_DIRECTIONS + LOCALVMAMBA_SMALL_DIRECTIONS:
        assert len(d) == 4 and len(set(d)) == 4 and set(d) <= set(routes.LOCALMAMBA_DIRECTIONS)
    assert LOCALVMAMBA_TINY_DIRECTIONS[0] == ("h", "h_flip", "w7", "w7_flip")
    assert LOCALVMAMBA_TINY_DIRECTIONS[-1] == ("h_flip", "v", "w7", "w7_flip")
    with torch.device("meta"):
        m = LocalVMamba()
    blocks = [b for s in m.stages for b in s.blocks]
    assert [b.op.directions for b in blocks] == list(LOCALVMAMBA_TINY_DIRECTIONS)
    with pytest.raises(ValueError, match="one tuple of directions per block"):
        LocalVMamba(depths=(1, 1, 1, 1))


def _official_order(name: str, h: int, w: int) -> list[int]:
    """Token visited at each step, written from the LocalMamba description (pad, windows, flip)."""
    base, _, fl = name.partition("_")
    if base == "h":
        seq = [i * w + j for i in range(h) for j in range(w)]
    elif base == "v":
        seq = [i * w + j for j in range(w) for i in range(h)]
    else:
        k = int(base[1:])
        hp, wp = -(-h // k) * k, -(-w // k) * k
        seq = []
        for gi in range(hp // k):
            for gj in range(wp // k):
                for a in range(k):
                    for b in range(k):
                        i, j = gi * k + a, gj * k + b
                        seq.append(i * w + j if (i < h and j < w) else -1)  # zero-padded token
    return seq[::-1] if fl else seq


@pytest.mark.parametrize("hw", [(5, 9), (9, 4), (3, 3)])
def test_routes_and_inverse_on_non_square_maps(hw):
    """Each route's output, scattered back by the kernel, equals scanning the explicitly
    permuted (zero-padded) sequence and un-permuting it, as the released code does."""
    h, w = hw
    torch.manual_seed(0)
    dirs = ("v", "w2_flip", "w7", "h_flip")
    m = LocalSS2D(8, dirs, d_state=3, ssm_ratio=1.0, gate=True).double()
    core = m.ssm
    u = torch.randn(2, h * w, 8, dtype=torch.float64)
    y = core(u, m.routes_for(h, w), merge="none")  # (2, L, K, 8)
    for k, name in enumerate(dirs):
        order = _official_order(name, h, w)
        seq = torch.stack([u[:, t] if t >= 0 else torch.zeros_like(u[:, 0]) for t in order], dim=1)
        dt, B, C = core.project(seq)  # zero tokens give dt = B = C = 0, as in the official padding
        sl = slice(k, k + 1)
        ys = selective_scan(
            seq, dt[:, :, sl].contiguous(), -torch.exp(core.A_logs[sl]), B[:, :, sl].contiguous(),
            C[:, :, sl].contiguous(), core.Ds[sl], core.dt_projs_bias[sl],
            route=routes.raster(len(order))[None], merge="sum",
        )
        expect = torch.zeros_like(u)
        for s, t in enumerate(order):
            if t >= 0:
                expect[:, t] = ys[:, s]
        torch.testing.assert_close(y[:, :, k], expect, rtol=1e-7, atol=1e-7)


def test_channel_attention_per_route_before_sum():
    torch.manual_seed(0)
    m = LocalSS2D(8, ("h", "v", "w2", "w2_flip"), d_state=2, ssm_ratio=1.0, gate=True).double()
    u = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    per_route = m.ssm(u.reshape(1, 24, 8), m.routes_for(4, 6), merge="none")
    expect = sum(m.attn(per_route[:, :, k]) for k in range(4))  # gate from each route's own mean
    torch.testing.assert_close(m.scan(u.reshape(1, 24, 8), m.routes_for(4, 6)), expect)
