"""Hi-Mamba: direction alternation, the local/region/gate structure, and the budget against VMamba.

FLOPs are multiply-adds in VMamba's convention (4.9G for VMamba-T), counted on the meta device at
224 x 224 by :func:`mamba_dense.encoders.complexity.model_complexity` (matmuls and convolutions
from ``torch.utils.flop_counter`` + the analytic scan cost 9 * L * D * N + L * D per route).
"""

from __future__ import annotations

import pytest
import torch

import mamba_dense.encoders as enc
from mamba_dense.encoders.complexity import model_complexity
from mamba_dense.encoders.himamba import HIMAMBA_DIRECTIONS, HierarchicalSS2D, direction_route
from mamba_dense.kernels import routes


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_params_and_flops_within_2_percent_of_vmamba(size):
    p_v, f_v = model_complexity(f"vmamba_{size}")
    p_h, f_h = model_complexity(f"himamba_{size}")
    assert abs(p_h / p_v - 1) < 0.02, (p_h, p_v)
    assert abs(f_h / f_v - 1) < 0.02, (f_h, f_v)
    if size == "tiny":
        assert 4.8e9 < f_v < 5.0e9  # the published 4.9G: the counting convention matches


def test_direction_alternation_and_structure():
    with torch.device("meta"):
        m = enc.create_encoder("himamba_tiny")
    blocks = [b for s in m.stages for b in s.blocks]
    assert [b.op.direction for b in blocks] == [HIMAMBA_DIRECTIONS[k % 4] for k in range(len(blocks))]
    assert all(isinstance(b.op, HierarchicalSS2D) and b.op.region_grid == 4 for b in blocks)
    assert blocks[0].op.local_ssm.num_routes == blocks[0].op.region_ssm.num_routes == 1
    assert direction_route("column_flip", 2, 3).tolist() == [[5, 2, 4, 1, 3, 0]]
    assert torch.equal(direction_route("row", 3, 4)[0], routes.raster(3, 4))
    with pytest.raises(ValueError, match="unknown Hi-Mamba direction"):
        direction_route("diagonal", 2, 2)


def test_gate_fuses_local_and_region():
    torch.manual_seed(0)
    m = HierarchicalSS2D(8, "row", d_state=2).double()
    x = torch.randn(2, 6, 10, 8, dtype=torch.float64)
    with torch.no_grad():
        m.gate_bias.fill_(-40.0)  # g -> 0: local path only
        y_local = m(x)
        m.gate_bias.fill_(40.0)  # g -> 1: region path only; constant over each pooled region's cells
        y_region = m(x)
    assert not torch.allclose(y_local, y_region)
    u = m.act(m.conv2d(m.in_proj(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    pooled = torch.nn.functional.adaptive_avg_pool2d(u.permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1)
    r = m.region_ssm(pooled.reshape(2, 16, 8).contiguous(), direction_route("row", 4, 4)).view(2, 4, 4, 8)
    up = torch.nn.functional.interpolate(r.permute(0, 3, 1, 2), size=(6, 10), mode="nearest").permute(0, 2, 3, 1)
    torch.testing.assert_close(y_region, m.out_proj(m.out_norm(up)))


def test_tiny_maps_smaller_than_region_grid():
    m = enc.create_encoder("himamba_tiny", depths=(1, 1, 1, 1), dims=16, num_classes=0)
    feats = m.forward_intermediates(torch.randn(1, 3, 20, 9), intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == [(5, 3), (3, 2), (2, 1), (1, 1)]
