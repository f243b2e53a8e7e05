"""Parameter counts against the papers / official repositories (1000-class head), built on meta."""

from __future__ import annotations

import pytest
import torch

import mamba_dense.encoders as enc


def _params(name: str, **kwargs) -> int:
    with torch.device("meta"):
        m = enc.create_encoder(name, num_classes=1000, **kwargs)
    return sum(p.numel() for p in m.parameters())


def test_vmamba_tiny_exact():
    # official vmamba_tiny_s1l8 (v05_noz): 30,249,064 parameters
    assert _params("vmamba_tiny") == 30_249_064


@pytest.mark.parametrize(
    "name, published",
    [
        ("vmamba_small", 50e6),
        ("vmamba_base", 89e6),
        ("vmamba_tiny_v0", 22.9e6),
        ("localvmamba_tiny", 26e6),
        ("localvmamba_small", 50e6),
    ],
)
def test_published_counts_within_2_percent(name, published):
    n = _params(name)
    assert abs(n / published - 1) < 0.02, f"{name}: {n:,} vs {published:,.0f}"


def test_feature_norms_and_headless_counts():
    base = _params("vmamba_tiny")
    dims = (96, 192, 384, 768)
    assert _params("vmamba_tiny", feature_norms=True) == base + 2 * sum(dims)
    with torch.device("meta"):
        m = enc.create_encoder("vmamba_tiny", num_classes=0)
    assert sum(p.numel() for p in m.parameters()) == base - (768 * 1000 + 1000)
