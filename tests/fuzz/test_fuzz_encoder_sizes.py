"""Input sizes at the boundary for the 2D encoders: batch 1, H x W drawn from 0..4096 x 0..64 (and
transposed), plus the exact edges 1x1, 4096x33, 33x4096, 1x4096 and 4096x1.

Every family runs narrowed (one block per stage, a few channels) so a 4096 x 64 image costs
milliseconds, on CPU through the PyTorch reference scan (``kernels._use_triton`` is False for CPU
tensors unless ``MAMBA_DENSE_TRITON_CPU=1``; ``TRITON_INTERPRET`` from ``tests/conftest.py`` does not
matter here). The contract checked (``_features.py``, ``vim.py``): any H, W >= 1 gives features of
shape (1, C_i, ceil(H / r_i), ceil(W / r_i)) for every ``feature_info`` entry, finite, and a finite
(1, num_classes) classifier output; an empty image (H or W = 0) or batch raises a ValueError that
names the minimum size. Nothing else (a bare library error, a silently wrong shape) passes.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import mamba_dense.encoders as enc
from mamba_dense.encoders.localmamba import LOCALVMAMBA_TINY_DIRECTIONS
from mamba_dense.kernels import _use_triton

NUM_CLASSES = 3

# name -> narrowed kwargs; one variant per distinct stem / downsampler / mixer / token layout
VARIANTS = {
    "vmamba_tiny": dict(depths=(1, 1, 1, 1), dims=4),  # conv stem, conv downsample, SS2D cross scan
    "vmamba_tiny_v0": dict(depths=(1, 1, 1, 1), dims=4, d_state=2),  # 4x4 patch stem, patch merging
    "vmamba_tiny+registers": dict(depths=(1, 1, 1, 1), dims=4, num_registers=2),  # Mamba(R) on a hierarchy
    "localvmamba_tiny": dict(depths=(1, 1, 1, 1), dims=4, d_state=2, directions=LOCALVMAMBA_TINY_DIRECTIONS[:4]),
    "himamba_tiny": dict(depths=(1, 1, 1, 1), dims=4, d_state=2),  # region grid pooled from tiny maps
    "vim_tiny": dict(depth=2, embed_dim=8, d_state=2, simple_pyramid=True),  # patch 16, middle class token
    "mambar_tiny": dict(depth=2, embed_dim=8, d_state=2, simple_pyramid=True),  # patch 16, registers
}
EDGES = [(1, 1), (4096, 33), (33, 4096), (1, 4096), (4096, 1)]


@pytest.fixture(scope="module")
def models():
    assert not _use_triton(torch.zeros(1)), "unset MAMBA_DENSE_TRITON_CPU: these tests use the reference scan"
    out = {}
    for key, kwargs in VARIANTS.items():
        name = key.split("+")[0]
        extra = {} if enc.get_encoder_entry(name).family == "vim" else dict(drop_path_rate=0.0)
        torch.manual_seed(0)
        out[key] = enc.create_encoder(name, num_classes=NUM_CLASSES, **kwargs, **extra).eval()
    return out


def _expected(model, h: int, w: int) -> list[tuple[int, ...]]:
    return [(1, d["num_chs"], -(-h // d["reduction"]), -(-w // d["reduction"])) for d in model.feature_info]


def _check(model, h: int, w: int) -> list[torch.Tensor]:
    """Run batch 1 at H x W: clear ValueError for an empty image, else the documented shapes."""
    x = torch.randn(1, 3, h, w)
    if h < 1 or w < 1:
        with pytest.raises(ValueError, match=r"at least 1 x 1 pixels.*got \(B, C, H, W\)"):
            model.forward_intermediates(x)
        with pytest.raises(ValueError, match=r"at least 1 x 1 pixels"):
            model(x)
        return []
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        logits = model(x)
    assert [tuple(f.shape) for f in feats] == _expected(model, h, w), (h, w)
    assert [d["reduction"] for d in model.feature_info] == [4, 8, 16, 32]
    for f in feats:
        assert f.dtype == torch.float32 and torch.isfinite(f).all(), (h, w)
    assert tuple(logits.shape) == (1, NUM_CLASSES) and torch.isfinite(logits).all()
    if isinstance(model, enc.HierarchicalEncoder):  # final normed map, channels-last, stride 32
        assert tuple(final.shape) == (1, -(-h // 32), -(-w // 32), model.dims[-1])
    else:  # tokens: patches of 16, then the class token and the registers
        extra = int(model.has_cls_token) + model.num_registers
        assert tuple(final.shape) == (1, -(-h // 16) * -(-w // 16) + extra, model.embed_dim)
    assert torch.isfinite(final).all()
    return feats


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(VARIANTS)), h=st.integers(0, 4096), w=st.integers(0, 64), transpose=st.booleans())
def test_random_sizes_give_documented_shapes_or_clear_error(models, key, h, w, transpose):
    if transpose:
        h, w = w, h
    _check(models[key], h, w)


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_edge_sizes_and_batch_independence(models, key):
    """The exact edges, and batch 1 == the same image inside a batch of 2 (no leakage through the
    padding or the scan between samples)."""
    model = models[key]
    torch.manual_seed(1)
    for h, w in EDGES:
        feats = _check(model, h, w)
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            single = model.forward_intermediates(x[:1], intermediates_only=True)
            pair = model.forward_intermediates(x, intermediates_only=True)
        assert len(feats) == len(single) == len(pair)
        for a, b in zip(single, pair):
            torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"at least one image"):
        model.forward_intermediates(torch.randn(0, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected an image batch \(B, 3, H, W\).*in_chans=1"):
        model.forward_intermediates(torch.randn(1, 1, 8, 8))


def test_reference_scan_path_is_the_one_tested(models):
    """Guard for the module's premise: CPU tensors take the PyTorch reference scan."""
    assert os.environ.get("MAMBA_DENSE_TRITON_CPU", "0") != "1"
    assert not _use_triton(torch.zeros(1))
