"""A model run on the meta device first (as smp and FLOP counters do) must still run for real after."""

import pytest
import torch

import mamba_dense.encoders  # noqa: F401
from mamba_dense.encoders import create_encoder

NARROW = {
    "vmamba_tiny": dict(dims=16, depths=(1, 1, 1, 1)),
    "localvmamba_tiny": dict(dims=16, depths=(1, 1, 1, 1),
                             directions=(("h", "w7", "v_flip", "w2"),) * 4),
    "himamba_tiny": dict(dims=16, depths=(1, 1, 1, 1)),
}


@pytest.mark.parametrize("name", sorted(NARROW))
def test_meta_forward_then_cpu_forward(name):
    with torch.device("meta"):
        m = create_encoder(name, **NARROW[name])
        m.forward_intermediates(torch.randn(1, 3, 37, 53), intermediates_only=True)
    real = create_encoder(name, **NARROW[name])
    feats = real.forward_intermediates(torch.randn(1, 3, 37, 53), intermediates_only=True)
    assert all(torch.isfinite(f).all() for f in feats)
