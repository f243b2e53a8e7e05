"""The 2D hierarchical encoders (VMamba, LocalMamba, Hi-Mamba): what the base tester
(``test_encoders.py``) does not cover: index/format options, pruning, a full-size smp forward, the
adapters, errors, gradient checkpointing and register splicing."""

from __future__ import annotations

import pytest
import timm
import torch

import mamba_dense.encoders as enc
from mamba_dense.encoders import feature_sizes



def _small_kwargs(name: str) -> dict:
    """Same variant (all its design switches), 1 block per stage and narrow widths."""
    kw = dict(depths=(1, 1, 1, 1), dims=16)
    if enc.get_encoder_entry(name).family == "localmamba":
        from mamba_dense.encoders.localmamba import LOCALVMAMBA_TINY_DIRECTIONS

        kw["directions"] = LOCALVMAMBA_TINY_DIRECTIONS[:4]
    return kw


def test_forward_intermediates_indices_formats_and_norm():
    torch.manual_seed(0)
    m = enc.create_encoder("vmamba_tiny", num_classes=3, **_small_kwargs("vmamba_tiny")).eval()
    info = m.feature_info
    assert [d["module"] for d in info] == [f"stages.{i}" for i in range(4)]
    with torch.no_grad():
        x = torch.randn(1, 3, 40, 24)
        final, nhwc = m.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", norm=True)
        assert [tuple(f.shape) for f in nhwc] == [(1, 5, 3, info[1]["num_chs"]), (1, 2, 1, info[3]["num_chs"])]
        assert torch.allclose(nhwc[1], final)  # norm=True applies the final norm to the last stage
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [f.shape[1] for f in last2] == [info[2]["num_chs"], info[3]["num_chs"]]
        early = m.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], m.forward_intermediates(x, intermediates_only=True)[1])


def test_timm_features_only_prunes_after_last_stage():
    with torch.device("meta"):
        part = timm.create_model("vmamba_tiny", features_only=True, out_indices=(1, 2))
    assert part.feature_info.channels() == [192, 384]
    assert len(part.model.stages) == 3


def test_smp_upernet_full_vmamba_tiny():
    smp = pytest.importorskip("segmentation_models_pytorch")
    net = smp.UPerNet("tu-vmamba_tiny", encoder_weights=None, classes=4).eval()
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


@pytest.mark.parametrize("name", ["vmamba_tiny", "localvmamba_tiny", "himamba_tiny"])
def test_timm_head_arguments_and_unknown_ones(name):
    """timm's train.py passes drop_rate (VMamba / LocalVMamba raised a TypeError from inside SS2D)
    and global_pool; a misspelt argument named nowhere was swallowed by Hi-Mamba."""
    import timm

    import mamba_dense.encoders  # noqa: F401

    kw = dict(depths=(1, 1, 1, 1), dims=16, num_classes=5)
    if name.startswith("local"):
        kw["directions"] = [("h", "v_flip", "w2", "w7")] * 4
    m = timm.create_model(name, drop_rate=0.3, global_pool="avg", **kw).eval()
    assert m.head_drop.p == 0.3 and m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    m.reset_classifier(0, global_pool="")
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 2, 2, 128)  # the unpooled (B, H, W, C) map
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['drop_path'\]\. Encoder arguments: .*drop_path_rate"):
        timm.create_model(name, drop_path=0.1, **kw)
    with pytest.raises(ValueError, match=r"global_pool='max': expected 'avg' or ''"):
        timm.create_model(name, global_pool="max", **kw)
