"""smp's decoders on our encoders as ``tu-<name>`` (one narrowed model per head, 64 x 64)."""

from __future__ import annotations

import pytest
import torch

smp = pytest.importorskip("segmentation_models_pytorch")

from mamba_dense.integrations.smp import create_smp_model  # noqa: E402

# NOTE: smp's own ``depth`` argument (number of encoder stages) shadows Vim's ``depth``; Vim runs
# its 24 blocks here, narrowed in width and state size instead.
CASES = [
    ("upernet", "vim_small", dict(embed_dim=16, d_state=2)),
    ("fpn", "mambar_base", dict(embed_dim=16, d_state=2)),
    ("unet", "vmamba_tiny", dict(depths=(1, 1, 1, 1), dims=16)),
    ("segformer", "himamba_small", dict(depths=(1, 1, 1, 1), dims=16)),
    ("upernet", "localvmamba_tiny", dict(depths=(1, 1, 1, 1), dims=16, directions=[("h", "v_flip", "w2", "w7")] * 4)),
]


@pytest.mark.parametrize("arch, name, kwargs", CASES, ids=[f"{a}-{n}" for a, n, _ in CASES])
def test_smp_head_on_tu_encoder(arch, name, kwargs):
    torch.manual_seed(0)
    net = smp.create_model(arch, encoder_name=f"tu-{name}", encoder_weights=None, classes=4, **kwargs)
    assert net.encoder.model.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    y = net.train()(x)
    assert y.shape == (2, 4, 64, 64) and torch.isfinite(y).all()
    y.square().mean().backward()
    enc_grads = [p.grad for p in net.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in enc_grads)


def test_adapter_builds_the_same_model():
    net = create_smp_model("fpn", "tu-vim_tiny", classes=2, embed_dim=16, d_state=2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 96)).shape == (1, 2, 64, 96)


@pytest.mark.parametrize("name, kwargs", [
    ("vmamba_tiny", dict(depths=(1, 1, 1, 1), dims=16)),
    ("vim_tiny", dict(embed_dim=16, depth=4, d_state=2)),
])
def test_torchvision_detectors_on_our_encoders(name, kwargs):
    """torchvision's BackboneWithFPN / create_feature_extractor cannot wrap the encoders (DESIGN.md
    lists a torchvision adapter; it was missing): a FasterRCNN and the adapter's MaskRCNN run."""
    from torchvision.models.detection import FasterRCNN

    from mamba_dense.integrations.torchvision import encoder_fpn_backbone, mask_rcnn

    torch.manual_seed(0)
    backbone = encoder_fpn_backbone(name, out_channels=32, **kwargs)
    levels = backbone(torch.randn(1, 3, 64, 96))
    assert list(levels) == ["0", "1", "2", "3", "pool"] and backbone.out_channels == 32
    assert [tuple(v.shape[-2:]) for v in levels.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    det = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=96).eval()
    with torch.no_grad():
        out = det([torch.rand(3, 64, 96)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
    model = mask_rcnn(name, num_classes=2, out_channels=32, encoder_kwargs=kwargs, min_size=64, max_size=96).train()
    mask = torch.zeros(1, 64, 96, dtype=torch.uint8)
    mask[0, 10:40, 20:60] = 1
    target = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "labels": torch.tensor([1]), "masks": mask}
    losses = model([torch.rand(3, 64, 96)], [target])
    sum(losses.values()).backward()
    assert {"loss_mask", "loss_classifier"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
