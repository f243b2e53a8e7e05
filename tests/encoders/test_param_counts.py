"""Parameter counts (1000-class head, built on the meta device) against the papers and against the
official code: ``_official.py`` writes each release's state-dict layout from its model code, so its
tensor count is the official model's parameter count, independent of our modules.

Three published figures are rounded more coarsely than 1%: the official code has exactly our counts,
and the papers print them rounded to the nearest million (LocalVMamba-T 25.53M -> "26M", -1.8%;
Vim-T 7.15M -> "7M", +2.1%; Mamba(R)-T 9.26M -> "9M", +2.9%). For those the test checks the
rounding instead of the 1% band.
"""

from __future__ import annotations

import pytest
import torch

import mamba_dense.encoders as enc

import _official as official

V2_S = dict(depths=(2, 2, 15, 2), ssm_ratio=2.0)
V0 = dict(d_state=16, ssm_ratio=2.0, version="v0")

# name, published (paper / README), official layout, published precision ("1%" or "round")
CASES = [
    ("vmamba_tiny", 30.2e6, dict(kind="vssm"), "1%"),
    ("vmamba_small", 50e6, dict(kind="vssm", **V2_S), "1%"),
    ("vmamba_base", 89e6, dict(kind="vssm", dims=128, **V2_S), "1%"),
    ("vmamba_tiny_v0", 22.9e6, dict(kind="vssm", depths=(2, 2, 9, 2), **V0), "1%"),
    ("localvmamba_tiny", 26e6, dict(kind="vssm", depths=(2, 2, 9, 2), local=True, **V0), "round"),
    ("localvmamba_small", 50e6, dict(kind="vssm", depths=(2, 2, 27, 2), local=True, **V0), "1%"),
    ("vim_tiny", 7e6, dict(kind="vim"), "round"),
    ("vim_small", 26e6, dict(kind="vim", embed_dim=384), "1%"),
    ("mambar_tiny", 9e6, dict(kind="vim", num_registers=12), "round"),
    ("mambar_small", 28e6, dict(kind="vim", embed_dim=384, num_registers=12, register_reduce=2), "1%"),
    ("mambar_base", 99e6, dict(kind="vim", embed_dim=768, num_registers=12, register_reduce=4), "1%"),
]


def params(name: str, **kwargs) -> int:
    with torch.device("meta"):
        m = enc.create_encoder(name, **kwargs)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name, published, layout, precision", CASES, ids=[c[0] for c in CASES])
def test_counts_equal_official_code_and_match_papers(name, published, layout, precision):
    layout = dict(layout)
    make = official.vssm if layout.pop("kind") == "vssm" else official.vim
    n = params(name, num_classes=1000)
    assert n == official.numel(make(device="meta", **layout)), name
    if precision == "1%":
        assert abs(n / published - 1) < 0.01, f"{name}: {n:,} vs published {published:,.0f}"
    else:
        assert round(n / 1e6) == published / 1e6, f"{name}: {n:,} does not round to {published:,.0f}"


def test_vmamba_tiny_exact():
    assert params("vmamba_tiny") == 30_249_064  # vssm1_tiny_0230s


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_himamba_within_2_percent_of_vmamba(size):
    assert abs(params(f"himamba_{size}") / params(f"vmamba_{size}") - 1) < 0.02


def test_registry_aliases_are_the_same_models():
    for size in ("tiny", "small", "base"):
        assert params(f"mambar_{size}") == params(f"vim_{size}_reg")


def test_dense_additions_and_headless_counts():
    base = params("vmamba_tiny")
    dims = (96, 192, 384, 768)
    assert params("vmamba_tiny", feature_norms=True) == base + 2 * sum(dims)
    assert params("vmamba_tiny", num_classes=0) == base - (768 * 1000 + 1000)
    assert params("vmamba_tiny", num_registers=3) == base + 3 * sum(dims)
    C = 384  # Vim-S pyramid: 3 transposed 2x2 convs with bias + one BatchNorm
    assert params("vim_small", simple_pyramid=True) == params("vim_small") + 3 * (4 * C * C + C) + 2 * C
