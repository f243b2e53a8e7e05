"""Base tester for the 2D hierarchical encoders: every registered variant of the VMamba,
LocalMamba and Hi-Mamba families at tiny input sizes on CPU (timm/smp's model-test pattern).

Add a family to ``FAMILIES`` to put its variants under the same contract.
"""

from __future__ import annotations

import pytest
import timm
import torch

import mamba_dense.encoders as enc
from mamba_dense.encoders import feature_sizes

FAMILIES = ("vmamba", "localmamba", "himamba")
NAMES = [n for f in FAMILIES for n in enc.list_encoders(family=f)]

_CACHE: dict[str, torch.nn.Module] = {}


def _small_kwargs(name: str) -> dict:
    """Same variant (all its design switches), 1 block per stage and narrow widths: for the
    adapter tests whose cost would otherwise be the full-size forward again."""
    kw = dict(depths=(1, 1, 1, 1), dims=16)
    if enc.get_encoder_entry(name).family == "localmamba":
        from mamba_dense.encoders.localmamba import LOCALVMAMBA_TINY_DIRECTIONS

        kw["directions"] = LOCALVMAMBA_TINY_DIRECTIONS[:4]
    return kw


def _model(name: str) -> torch.nn.Module:
    """One CPU instance per variant (3-class head) shared by the tests of this module."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = enc.create_encoder(name, num_classes=3, drop_path_rate=0.0).eval()
    return _CACHE[name]


def test_registry_has_the_issue_variants():
    for n in ["vmamba_tiny", "vmamba_small", "vmamba_base", "localvmamba_tiny", "localvmamba_small",
              "himamba_tiny", "himamba_small", "vmamba_tiny_v0"]:
        assert n in NAMES and n in timm.list_models(n)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    m = _model(name).train()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = m(x)
    assert out.shape == (1, 3)
    out.square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert x.grad is not None and torch.isfinite(x.grad).all()
    m.zero_grad(set_to_none=True)
    m.eval()


@pytest.mark.parametrize("name", NAMES)
def test_features_match_feature_info_any_size(name):
    m = _model(name)
    info = m.feature_info
    assert [d["reduction"] for d in info] == [4, 8, 16, 32]
    assert [d["module"] for d in info] == [f"stages.{i}" for i in range(4)]
    with torch.no_grad():
        for h, w in [(63, 45)]:
            feats = m.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
            assert len(feats) == 4
            for f, d, (fh, fw) in zip(feats, info, feature_sizes(h, w)):
                assert f.shape == (1, d["num_chs"], fh, fw), (h, w, f.shape)
                assert torch.isfinite(f).all()
        x = torch.randn(1, 3, 40, 24)
        final, nhwc = m.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", norm=True)
        assert [tuple(f.shape) for f in nhwc] == [(1, 5, 3, info[1]["num_chs"]), (1, 2, 1, info[3]["num_chs"])]
        assert torch.allclose(nhwc[1], final)  # norm=True applies the final norm to the last stage
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [f.shape[1] for f in last2] == [info[2]["num_chs"], info[3]["num_chs"]]


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_construction(name):
    with torch.device("meta"):
        m = enc.create_encoder(name)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in _model(name).parameters()) - (
        _model(name).head.weight.numel() + _model(name).head.bias.numel()
    ) + 1000 * (m.num_features + 1)


@pytest.mark.parametrize("name", NAMES)
def test_timm_features_only(name):
    with torch.device("meta"):  # full size: contract only
        full = timm.create_model(name, features_only=True)
        part = timm.create_model(name, features_only=True, out_indices=(1, 2))
    assert full.feature_info.reduction() == [4, 8, 16, 32]
    assert full.feature_info.channels() == [d["num_chs"] for d in _model(name).feature_info]
    assert part.feature_info.channels() == full.feature_info.channels()[1:3]
    assert len(part.model.stages) == 3  # pruned after the last requested stage
    m = timm.create_model(name, features_only=True, **_small_kwargs(name)).eval()
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 33, 31))
    assert [f.shape[1] for f in feats] == m.feature_info.channels() == [16, 32, 64, 128]
    assert [tuple(f.shape[2:]) for f in feats] == feature_sizes(33, 31)


@pytest.mark.parametrize("name", NAMES)
def test_smp_decoder(name):
    smp = pytest.importorskip("segmentation_models_pytorch")
    arch = {"vmamba": smp.UPerNet, "localmamba": smp.FPN, "himamba": smp.UPerNet}[enc.get_encoder_entry(name).family]
    net = arch(f"tu-{name}", encoder_weights=None, classes=4, **_small_kwargs(name)).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 4, 64, 64) and torch.isfinite(y).all()


def test_smp_upernet_full_vmamba_tiny():
    smp = pytest.importorskip("segmentation_models_pytorch")
    net = smp.UPerNet("tu-vmamba_tiny", encoder_weights=None, classes=4).eval()
    net.encoder.model.model.load_state_dict(_model("vmamba_tiny").state_dict(), strict=False)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 4, 64, 64)


def test_smp_unet_and_adapter():
    from mamba_dense.integrations.smp import create_smp_model, smp_encoder_name

    assert smp_encoder_name("vmamba_tiny") == "tu-vmamba_tiny"
    with pytest.raises(KeyError, match="not a mamba-dense 2D encoder"):
        smp_encoder_name("resnet18")
    net = create_smp_model("unet", "vmamba_tiny", classes=2, depths=(1, 1, 1, 1), dims=16).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)


def test_errors_tell_the_fix():
    with pytest.raises(ValueError, match="never downloaded"):
        timm.create_model("vmamba_tiny", pretrained=True)
    with pytest.raises(ValueError, match="output_stride=32"):
        enc.create_encoder("vmamba_tiny", output_stride=16)
    m = enc.create_encoder("vmamba_tiny", depths=(1, 1, 1, 1), dims=8)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    m = enc.create_encoder("vmamba_tiny", depths=(1, 1, 2, 1), dims=16, num_classes=2, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    m.set_grad_checkpointing(True)
    out = m(x)
    out.sum().backward()
    assert torch.allclose(ref, out, atol=1e-6)
    assert "stages.0.blocks.0.op.ssm.A_logs" in m.no_weight_decay()


@pytest.mark.parametrize("name", ["vmamba_tiny", "vmamba_tiny_v0", "localvmamba_tiny", "himamba_tiny"])
def test_registers_spliced_and_dropped(name, monkeypatch):
    import mamba_dense.layers.ssm as ssm_module

    seen = []
    real = ssm_module.selective_scan

    def spy(x, *args, route, **kwargs):
        seen.append((x.shape[1], route.clone()))
        return real(x, *args, route=route, **kwargs)

    monkeypatch.setattr(ssm_module, "selective_scan", spy)
    torch.manual_seed(0)
    m = enc.create_encoder(name, num_classes=2, num_registers=3, drop_path_rate=0.1, **_small_kwargs(name))
    x = torch.randn(2, 3, 36, 28)
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == feature_sizes(36, 28)  # registers never reach features
    m(x).sum().backward()
    assert all(s.registers.grad is not None and s.registers.grad.abs().sum() > 0 for s in m.stages)
    spliced = [(L, r) for L, r in seen if L > 16]  # Hi-Mamba's 4x4 region scan has no registers
    assert spliced
    for L, r in spliced:  # each route visits the 3 registers (the last 3 tokens) once, never at an end
        for row in r:
            pos = [int((row == L - 3 + i).nonzero()) for i in range(3)]
            assert 0 < pos[0] < pos[1] < pos[2] < row.numel() - 1
