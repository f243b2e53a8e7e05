"""Heads: output shapes, backward, batch size 1 in training, norm options, Mask R-CNN assembly."""

import pytest
import timm
import torch

import mamba_dense.encoders  # noqa: F401
from mamba_dense.heads import EncoderFPN, FCNHead, FPNHead, UPerNetHead, build_mask_rcnn, make_transform
from mamba_dense.heads.upernet import LayerNorm2d, PooledBatchNorm2d

CHANNELS = [16, 32, 64, 128]
# Fewer proposals and detections than the recipe: the untrained model would keep 100 boxes and
# run the 256-channel mask head on each, slow on a CPU.
SMALL_RCNN = dict(
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50, box_batch_size_per_image=64, box_detections_per_img=20,
)


def features(batch: int, size: int = 64, channels=CHANNELS) -> list[torch.Tensor]:
    return [torch.randn(batch, c, size // 4 // 2**i, size // 4 // 2**i, requires_grad=True) for i, c in enumerate(channels)]


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm", "layernorm", "none"])
def test_upernet_shapes_and_backward(norm):
    head = UPerNetHead(CHANNELS, num_classes=7, channels=32, norm=norm).train()
    feats = features(2)
    out = head(feats)
    assert out.shape == (2, 7, 16, 16)
    out.mean().backward()
    assert all(f.grad is not None for f in feats)


def test_upernet_batch_size_one_in_training():
    # smp's UPerNetDecoder raises here: BatchNorm on the 1x1 PSP map of a single image.
    head = UPerNetHead(CHANNELS, num_classes=3, channels=32).train()
    out = head(features(1))
    out.sum().backward()
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    # with more than one value per channel the pooled norm is plain BatchNorm (stats update)
    bn = head.psp_branches[0][1][1]
    assert isinstance(bn, PooledBatchNorm2d)
    before = bn.running_mean.clone()
    head(features(1))
    assert torch.equal(bn.running_mean, before)  # one value: running stats untouched
    head(features(2))
    assert not torch.equal(bn.running_mean, before)


def test_layernorm2d_normalizes_channels():
    ln = LayerNorm2d(8)
    y = ln(torch.randn(2, 8, 5, 3) * 4 + 1)
    assert torch.allclose(y.mean(1), torch.zeros(2, 5, 3), atol=1e-5)


def test_upernet_rejects_bad_norm():
    with pytest.raises(ValueError, match="norm"):
        UPerNetHead(CHANNELS, 3, norm="syncbn")


def test_fpn_head_shapes_and_size_rule():
    head = FPNHead(CHANNELS, num_classes=5, pyramid_channels=32, segmentation_channels=32)
    assert head(features(2)).shape == (2, 5, 16, 16)
    odd = [torch.randn(1, c, s, s) for c, s in zip(CHANNELS, [17, 9, 5, 3])]
    with pytest.raises(ValueError, match="multiple of 32"):
        head(odd)
    with pytest.raises(ValueError, match="multiple of 32"):
        FPNHead(CHANNELS, 5, segmentation_channels=48)


def test_fcn_head():
    head = FCNHead(64, num_classes=4, channels=16)
    assert head(torch.randn(1, 64, 4, 4)).shape == (1, 4, 4, 4)


def test_mask_rcnn_train_and_eval_keep_sizes():
    enc = timm.create_model("vmamba_tiny", features_only=True, dims=16, depths=(1, 1, 1, 1))
    model = build_mask_rcnn(EncoderFPN(enc, enc.feature_info.channels(), 32), num_classes=3, **SMALL_RCNN)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    targets = [
        {"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 72, 64, dtype=torch.uint8)},
    ]
    model.train()
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        image_list, _ = model.transform(images)
        assert image_list.image_sizes == [(64, 80), (72, 64)]  # no resize inside the model
        out = model(images)
    assert out[0]["masks"].shape[-2:] == (64, 80)


def test_mask_rcnn_recipe_defaults_and_fp32_detections_under_autocast():
    enc = timm.create_model("vmamba_tiny", features_only=True, dims=16, depths=(1, 1, 1, 1))
    model = build_mask_rcnn(EncoderFPN(enc, enc.feature_info.channels(), 32), num_classes=3)
    assert model.rpn._post_nms_top_n["training"] == 1000 and model.rpn._post_nms_top_n["testing"] == 1000
    small = dict(SMALL_RCNN, box_score_thresh=0.0)
    model = build_mask_rcnn(EncoderFPN(enc, enc.feature_info.channels(), 32), num_classes=3, **small).eval()
    torch.manual_seed(0)
    image = torch.rand(3, 64, 1344)  # boxes past 1024 px: bf16 holds them on an 8 px grid
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        det = model([image])[0]
    assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32
    x = det["boxes"][:, [0, 2]].flatten()
    assert len(x) and not bool((x[x > 1024] % 8 == 0).all())
    with pytest.raises(ValueError, match="4 maps.*encoder_out_indices"):
        EncoderFPN(enc, enc.feature_info.channels()[1:], 32)
    with pytest.raises(ValueError, match="num_classes"):
        build_mask_rcnn(EncoderFPN(enc, enc.feature_info.channels(), 32), num_classes=0)


def test_heads_name_bad_feature_maps_and_arguments():
    maps = features(1)
    for head in (FPNHead(CHANNELS, 5, pyramid_channels=32, segmentation_channels=32), UPerNetHead(CHANNELS, 5, channels=32)):
        name = type(head).__name__
        with pytest.raises(ValueError, match=f"{name} expects 4 feature maps"):
            head(maps[:3])
        with pytest.raises(ValueError, match=f"{name} was built for maps of channels"):
            head([*maps[:3], torch.randn(1, 96, 2, 2)])
    with pytest.raises(ValueError, match="FPNHead expects 4"):
        FPNHead(CHANNELS, 5, pyramid_channels=32, segmentation_channels=32)([*maps, maps[-1]])
    for kw in (dict(num_classes=0), dict(channels=0), dict(pool_scales=[0])):
        with pytest.raises(ValueError, match=next(iter(kw))):
            UPerNetHead(CHANNELS, **{"num_classes": 5, **kw})


def test_fpn_head_upsamples_with_half_pixel_centres(monkeypatch):
    """smp's per-level branches upsample with align_corners=True; ours as mmseg / detectron2 (False)."""
    import torch.nn.functional as F

    calls = []
    real = F.interpolate

    def spy(*args, **kwargs):
        calls.append((kwargs.get("mode"), kwargs.get("align_corners")))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    FPNHead(CHANNELS, 3, pyramid_channels=32, segmentation_channels=32).eval()(features(1))
    bilinear = [c for c in calls if c[0] == "bilinear"]
    assert len(bilinear) == 6 and all(a is False for _, a in bilinear)


def test_make_transform_resizes_once():
    t = make_transform(32, 64).eval()
    batch, _ = t([torch.rand(3, 64, 128)])
    assert batch.image_sizes == [(32, 64)]
    t = make_transform(32, 64, skip_train_resize=True).train()
    batch, _ = t([torch.rand(3, 64, 128)])
    assert batch.image_sizes == [(64, 128)]
