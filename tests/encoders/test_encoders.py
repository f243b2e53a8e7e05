"""Base tester: every registered encoder (2D and 3D) under one contract (timm's / smp's
``tests/models`` pattern), on CPU.

Forward passes use the variant with all its design switches but narrowed (one block per stage,
small widths; see ``narrow_kwargs``), and once more at the published widths with one block per
stage (``shallow_kwargs``); the full-size variants are built (and run) on the meta device only.
2D inputs are 64 x 96 (and an odd 45 x 71), 3D inputs 32 x 48 x 40.
"""

from __future__ import annotations

import pytest
import timm
import torch

import mamba_dense
import mamba_dense.encoders as enc
from mamba_dense.encoders import feature_sizes
from mamba_dense.encoders.localmamba import LOCALVMAMBA_SMALL_DIRECTIONS, LOCALVMAMBA_TINY_DIRECTIONS

NAMES = enc.list_encoders()
NAMES_2D = enc.list_encoders(spatial_dims=2)
SHAPE_2D, ODD_2D, SHAPE_3D = (64, 96), (45, 71), (32, 48, 40)


def narrow_kwargs(name: str) -> dict:
    """Same variant (stem, downsampler, mixer, tokens), fewer blocks and channels."""
    family = enc.get_encoder_entry(name).family
    if family in ("vmamba", "himamba"):
        return dict(depths=(1, 1, 1, 1), dims=16)
    if family == "localmamba":
        return dict(depths=(1, 1, 1, 1), dims=16, directions=LOCALVMAMBA_TINY_DIRECTIONS[:4])
    if family == "vim":
        return dict(depth=2, embed_dim=32, d_state=4, simple_pyramid=True)
    if family == "volumetric":
        return dict(dims=(8, 16, 16, 24), depths=(1, 1, 1, 1))
    raise AssertionError(f"add narrowing kwargs for the new family {family!r}")


def shallow_kwargs(name: str) -> dict:
    """The published widths (dims, embed_dim, d_state, registers), one block per stage."""
    family = enc.get_encoder_entry(name).family
    if family == "vim":
        return dict(depth=2, simple_pyramid=True)
    kw: dict = dict(depths=(1, 1, 1, 1))
    if family == "localmamba":
        kw["directions"] = (LOCALVMAMBA_SMALL_DIRECTIONS if "small" in name else LOCALVMAMBA_TINY_DIRECTIONS)[:4]
    return kw


def build(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = narrow_kwargs(name)
    if enc.get_encoder_entry(name).spatial_dims == 2:
        kw.update(num_classes=3, drop_path_rate=0.0)
    return enc.create_encoder(name, **dict(kw, **kwargs))


def image(name: str, shape2d=SHAPE_2D) -> torch.Tensor:
    if enc.get_encoder_entry(name).spatial_dims == 2:
        return torch.randn(2, 3, *shape2d)
    return torch.randn(1, 1, *SHAPE_3D)


def expected_shapes(model, x) -> list[tuple[int, ...]]:
    spatial = x.shape[2:]
    return [
        (x.shape[0], d["num_chs"], *(-(-s // d["reduction"]) for s in spatial)) for d in model.feature_info
    ]


def test_registry_covers_the_issue_variants_2d_and_3d():
    for n in ["vmamba_tiny", "vmamba_small", "vmamba_base", "localvmamba_tiny", "localvmamba_small",
              "himamba_tiny", "himamba_small", "vim_tiny", "vim_small", "mambar_small", "mambar_base"]:
        assert n in NAMES_2D and timm.is_model(n)
    assert {"segmamba_tiny", "vmamba3d_tiny"} <= set(enc.list_encoders(spatial_dims=3))
    assert not timm.is_model("segmamba_tiny")  # 3D encoders live in our registry only
    assert mamba_dense.list_encoders() == NAMES  # the top-level shortcut
    assert mamba_dense.create_encoder is enc.create_encoder
    with pytest.raises(KeyError, match="similar"):
        enc.create_encoder("vmamba_tiniest")


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_features_match_feature_info(name):
    m = build(name).train()
    x = image(name)
    final, feats = m.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == expected_shapes(m, x)
    red = [d["reduction"] for d in m.feature_info]
    assert red == ([4, 8, 16, 32] if x.dim() == 4 else [2, 4, 8, 16])
    loss = sum(f.square().mean() for f in feats) + final.float().square().mean()
    if x.dim() == 4:
        loss = loss + m(x).square().mean()  # the classifier path (head, Mamba(R)'s neck) too
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_odd_non_square_input_and_deterministic_eval(name):
    m = build(name).eval()
    x = image(name, ODD_2D)
    with torch.no_grad():
        a = m.forward_intermediates(x, intermediates_only=True)
        b = m.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in a] == expected_shapes(m, x)
    if x.dim() == 4:
        assert [tuple(f.shape[2:]) for f in a] == feature_sizes(*ODD_2D)
    for fa, fb in zip(a, b):
        assert torch.isfinite(fa).all()
        assert torch.equal(fa, fb)  # same input twice -> identical output in eval mode


@pytest.mark.parametrize("name", NAMES)
def test_full_width_shallow_forward_backward(name):
    torch.manual_seed(0)
    m = enc.create_encoder(name, **shallow_kwargs(name))
    x = image(name)[:1]
    final, feats = m.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == expected_shapes(m, x)
    (sum(f.mean() for f in feats) + final.float().mean()).backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    unused = sorted(n for n, g in grads.items() if g is None)  # only the classifier is off this path
    assert all(n.split(".")[0] in ("head", "neck", "norm_neck") for n in unused), unused[:5]


@pytest.mark.parametrize("name", NAMES)
def test_full_size_on_meta_device(name):
    with torch.device("meta"):
        m = enc.create_encoder(name)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) > 5e6
    if enc.get_encoder_entry(name).spatial_dims == 2:
        with torch.device("meta"):
            f = timm.create_model(name, features_only=True)
        assert f.feature_info.reduction() == [4, 8, 16, 32]
        with torch.device("meta"):  # the full-size forward contract, shapes only
            feats = f(torch.empty(1, 3, *SHAPE_2D))
        assert [tuple(t.shape[2:]) for t in feats] == feature_sizes(*SHAPE_2D)
        assert [t.shape[1] for t in feats] == f.feature_info.channels()


@pytest.mark.parametrize("name", NAMES_2D)
def test_timm_features_only_narrowed(name):
    m = timm.create_model(name, features_only=True, **narrow_kwargs(name)).eval()
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 33, 31)
    with torch.no_grad():
        feats = m(x)
    assert [f.shape[1] for f in feats] == m.feature_info.channels()
    assert [tuple(f.shape[2:]) for f in feats] == feature_sizes(33, 31)
    part = timm.create_model(name, features_only=True, out_indices=(1, 2), **narrow_kwargs(name)).eval()
    with torch.no_grad():
        assert [tuple(f.shape[2:]) for f in part(x)] == feature_sizes(33, 31)[1:3]
