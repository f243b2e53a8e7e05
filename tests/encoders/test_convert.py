"""``mamba_dense.convert``: official checkpoints (layouts written in ``_official.py`` from the official
model code) -> our encoders. Full-size variants are checked key by key on the meta device; the
file-path API runs on narrowed variants saved to a temporary file."""

from __future__ import annotations

import argparse
import pickle
import re
import warnings

import _official as official
import pytest
import timm
import torch

import mamba_dense.encoders as enc
from mamba_dense.convert import CheckpointMismatchError, CorruptCheckpointError, convert_state_dict, load_encoder_weights
from mamba_dense.encoders.localmamba import LOCALVMAMBA_TINY_DIRECTIONS
from mamba_dense.encoders.vmamba import checkpoint_filter_fn

V2_S = dict(depths=(2, 2, 15, 2), ssm_ratio=2.0)
V0_T = dict(depths=(2, 2, 9, 2), d_state=16, ssm_ratio=2.0)
FULL = [
    ("vmamba_tiny", official.vssm, {}),
    ("vmamba_small", official.vssm, V2_S),
    ("vmamba_base", official.vssm, dict(dims=128, **V2_S)),
    ("vmamba_tiny_v0", official.vssm, dict(version="v0", **V0_T)),
    ("vmamba_tiny_v0", official.vssm, dict(version="legacy", **V0_T)),
    ("localvmamba_tiny", official.vssm, dict(version="v0", local=True, **V0_T)),
    ("localvmamba_small", official.vssm, dict(V0_T, version="v0", local=True, depths=(2, 2, 27, 2))),
    ("vim_tiny", official.vim, {}),
    ("vim_small", official.vim, dict(embed_dim=384)),
    ("mambar_small", official.vim, dict(embed_dim=384, num_registers=12, register_reduce=2)),
    ("mambar_base", official.vim, dict(embed_dim=768, num_registers=12, register_reduce=4)),
    ("segmamba_tiny", official.segmamba_encoder, {}),
]


@pytest.mark.parametrize("name, make, layout", FULL, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(FULL)])
def test_full_size_official_layout_covers_every_key(name, make, layout):
    with torch.device("meta"):
        model = enc.create_encoder(name)
    sd = make(device="meta", **layout)
    converted, left_out = convert_state_dict(model, {"model": sd})
    own = model.state_dict()
    assert not left_out
    assert set(converted) == set(own), (sorted(set(own) - set(converted))[:5], sorted(set(converted) - set(own))[:5])
    assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)
    assert official.numel(sd) == sum(v.numel() for v in converted.values())  # every official tensor used once


# ---------------------------------------------------------------------------------------------
# the file-path API, narrowed variants

DEPTHS, C0 = (1, 1, 2, 1), 16


def _save(tmp_path, sd, **extra):
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "epoch": 3, **extra}, path)
    return path


def _assert_everything_loaded(report, model, sd, initialized=()):
    own = model.state_dict()
    assert report.loaded == sorted(set(own) - set(initialized))
    assert sorted(report.initialized) == sorted(initialized)
    assert not report.ignored
    assert official.numel(sd) == sum(own[k].numel() for k in report.loaded if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("version", ["v2", "v2-conv1x1", "v0", "legacy", "local"])
def test_vssm_file_loads_strictly(tmp_path, version):
    v2 = version.startswith("v2")
    if v2:
        layout = dict(d_state=1, ssm_ratio=1.0, linear2d_as_conv=version == "v2-conv1x1")
    else:
        layout = dict(d_state=16, ssm_ratio=2.0, version="v0" if version == "local" else version, local=version == "local")
    layout.update(depths=DEPTHS, dims=C0)
    sd = official.vssm(**layout)
    name = "vmamba_tiny" if v2 else ("localvmamba_tiny" if version == "local" else "vmamba_tiny_v0")
    kw = dict(directions=LOCALVMAMBA_TINY_DIRECTIONS[:5]) if version == "local" else {}
    model = enc.create_encoder(name, depths=DEPTHS, dims=C0, **kw)
    report = load_encoder_weights(model, _save(tmp_path, sd))
    _assert_everything_loaded(report, model, sd)
    blk = model.stages[2].blocks[1].op
    op = "layers.2.blocks.1." + ("self_attention." if version == "legacy" else "op.")
    di = blk.d_inner
    torch.testing.assert_close(blk.ssm.A_logs, sd[op + "A_logs"].view(4, di, -1))  # flat (K*D, N) -> (K, D, N)
    torch.testing.assert_close(blk.ssm.Ds, sd[op + "Ds"].view(4, di))
    torch.testing.assert_close(blk.ssm.x_proj_weight, sd[op + "x_proj_weight"])
    if v2:
        torch.testing.assert_close(model.stem.conv2.weight, sd["patch_embed.5.weight"])
        torch.testing.assert_close(model.stages[3].downsample.norm.bias, sd["layers.2.downsample.3.bias"])
        fc1 = sd["layers.0.blocks.0.mlp.fc1.weight"]
        torch.testing.assert_close(model.stages[0].blocks[0].mlp.fc1.weight, fc1.flatten(1))  # 1x1 conv -> linear
        torch.testing.assert_close(model.head.weight, sd["classifier.head.weight"])
    else:
        pe = "patch_embed.proj.weight" if version == "legacy" else "patch_embed.0.weight"
        torch.testing.assert_close(model.stem.proj.weight, sd[pe])
        red = sd["layers.2.downsample.reduction.weight"]
        torch.testing.assert_close(model.stages[3].downsample.reduction.weight, red)
    if version == "local":
        torch.testing.assert_close(blk.attn.channel_select.weight, sd[op + "multi_scan.attn.channel_select.weight"])


@pytest.mark.parametrize("kind", ["vim", "mambar"])
def test_vim_and_mambar_files_load_strictly(tmp_path, kind):
    kw = dict(embed_dim=32, depth=2, d_state=4, img_size=64)
    if kind == "vim":
        model, sd = enc.create_encoder("vim_tiny", **kw), official.vim(**kw)
    else:
        model = enc.create_encoder("mambar_small", num_registers=4, **kw)
        sd = official.vim(num_registers=4, register_reduce=2, **kw)
    report = load_encoder_weights(model, _save(tmp_path, sd))
    _assert_everything_loaded(report, model, sd)
    mix = model.blocks[1].mixer
    torch.testing.assert_close(mix.conv1d_weight[1], sd["layers.1.mixer.conv1d_b.weight"][:, 0])
    torch.testing.assert_close(mix.ssm.A_logs[1], sd["layers.1.mixer.A_b_log"])
    torch.testing.assert_close(mix.ssm.dt_projs_bias[0], sd["layers.1.mixer.dt_proj.bias"])
    M = 16
    if kind == "vim":  # the middle class token's position embedding is split out
        torch.testing.assert_close(model.cls_pos_embed, sd["pos_embed"][:, M // 2 : M // 2 + 1])
        torch.testing.assert_close(model.pos_embed[:, M // 2], sd["pos_embed"][:, M // 2 + 1])
    else:
        torch.testing.assert_close(model.reg_token, sd["cls_token"])
        torch.testing.assert_close(model.norm_neck.weight, sd["norm_neck.weight"])


def test_segmamba_whole_model_file(tmp_path):
    kw = dict(dims=(8, 16, 16, 16), depths=(1, 2, 1, 1), d_state=2)
    model = enc.create_encoder("segmamba_tiny", **kw)
    sd = official.segmamba_encoder(**kw)
    whole = {"vit." + k: v for k, v in sd.items()} | {"decoder5.transp_conv.conv.weight": torch.zeros(2)}
    report = load_encoder_weights(model, _save(tmp_path, whole))
    assert report.ignored == ["decoder5.transp_conv.conv.weight"]  # the decoder of the whole model
    report.ignored = []
    _assert_everything_loaded(report, model, sd)
    torch.testing.assert_close(model.stages[1][1].mamba.ssm.A_logs[2], sd["stages.1.1.mamba.A_s_log"])
    # the release's trainer saves a DistributedDataParallel model ("module." keys), as {"module": ...} too:
    # the filter that segmamba_tiny(pretrained=True)'s message recommends returned them untouched
    from mamba_dense.encoders.volumetric import segmamba_checkpoint_filter

    ddp = {"module." + k: v for k, v in whole.items()}
    for ckpt in (ddp, {"module": whole}):
        fresh = enc.create_encoder("segmamba_tiny", **kw)
        missing, unexpected = fresh.load_state_dict(segmamba_checkpoint_filter(ckpt), strict=False)
        assert not missing and not unexpected  # (the whole model's decoder left out)
    older = {k: v for k, v in whole.items() if "_s." not in k and not k.endswith("_s_log") and not k.endswith("D_s")}
    with pytest.raises(CheckpointMismatchError, match=r"lacks \[.*conv1d_s.weight.*three scan directions"):
        load_encoder_weights(model, _save(tmp_path, older))


# ---------------------------------------------------------------------------------------------
# dense models: headless / features-only encoders, dense backbone checkpoints


def test_features_only_encoder_ignores_the_classifier(tmp_path):
    sd = official.vssm(depths=DEPTHS, dims=C0)
    feats = timm.create_model("vmamba_tiny", features_only=True, depths=DEPTHS, dims=C0)
    report = load_encoder_weights(feats, _save(tmp_path, sd))  # the timm wrapper: loads into .model
    assert sorted(report.ignored) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    out_proj = feats.model.stages[0].blocks[0].op.out_proj.weight
    torch.testing.assert_close(out_proj, sd["layers.0.blocks.0.op.out_proj.weight"])


def test_mmseg_backbone_checkpoint_with_outnorms(tmp_path):
    sd = official.vssm(depths=DEPTHS, dims=C0, head=0, outnorms=True)
    ckpt = {"backbone." + k: v for k, v in sd.items()} | {"decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1)}
    model = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0, num_classes=0, feature_norms=True)
    report = load_encoder_weights(model, _ckpt(tmp_path, ckpt))
    assert report.ignored == ["decode_head.conv_seg.weight"]  # the segmentor's decoder
    assert report.initialized == ["norm.bias", "norm.weight"]  # Backbone_VSSM has no classifier norm
    torch.testing.assert_close(model.feature_norms[3].weight, sd["outnorm3.weight"])


def _ckpt(tmp_path, state_dict):
    path = tmp_path / "mmseg.pth"
    torch.save({"state_dict": state_dict, "meta": {"iter": 160000}}, path)
    return path


def test_classification_checkpoint_into_dense_vim_keeps_pyramid_at_init(tmp_path):
    kw = dict(embed_dim=32, depth=4, d_state=4, img_size=64)
    path = _save(tmp_path, official.vim(**kw))
    feats = timm.create_model("vim_small", features_only=True, **kw)
    report = load_encoder_weights(feats, path)
    assert report.initialized and all(k.startswith("pyramid.") for k in report.initialized)
    assert {"head.weight", "head.bias", "norm.weight"} == set(report.ignored)
    # the same file through timm's own pretrained path (filter fills the pyramid for strict loading)
    overlay = dict(file=str(path))
    t = timm.create_model("vim_small", features_only=True, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    torch.testing.assert_close(t.model.blocks[3].mixer.ssm.Ds, feats.model.blocks[3].mixer.ssm.Ds)


def test_vim_segmentation_backbone_with_fpn(tmp_path):
    kw = dict(embed_dim=32, depth=4, d_state=4, img_size=64)
    sd = official.vim(cls_token=False, fpn=True, head=0, **kw)
    model = enc.create_encoder("vim_small", cls_token=False, simple_pyramid=True, num_classes=0, **kw)
    report = load_encoder_weights(model, _ckpt(tmp_path, {"backbone." + k: v for k, v in sd.items()}))
    assert report.initialized == ["pyramid.levels.0.1.num_batches_tracked"] and not report.ignored
    torch.testing.assert_close(model.pyramid.levels[0][3].weight, sd["fpn1.3.weight"])
    torch.testing.assert_close(model.pyramid.levels[1][0].bias, sd["fpn2.0.bias"])


def test_cls_token_into_a_cls_free_model_needs_ignore(tmp_path):
    kw = dict(embed_dim=32, depth=2, d_state=4, img_size=64)
    path = _save(tmp_path, official.vim(**kw))
    model = enc.create_encoder("vim_tiny", cls_token=False, **kw)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(in the file, not in the encoder\): \['cls_pos_embed', 'cls_token'\]"):
        load_encoder_weights(model, path)
    report = load_encoder_weights(model, path, ignore=("cls_*",))
    assert report.ignored == ["cls_pos_embed", "cls_token"]


# ---------------------------------------------------------------------------------------------
# errors are never silent


def test_missing_unexpected_and_shape_errors_name_the_keys(tmp_path):
    model = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0)
    sd = official.vssm(depths=DEPTHS, dims=C0)
    sd.pop("layers.1.blocks.0.op.Ds")
    sd["layers.0.blocks.0.op.extra_gate"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys \(in the encoder, not in the file\): \['stages.1.blocks.0.op.ssm.Ds'\]") as e:
        load_encoder_weights(model, _save(tmp_path, sd))
    assert "stages.0.blocks.0.op.extra_gate" in str(e.value)
    wide = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=24)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_encoder_weights(wide, _save(tmp_path, official.vssm(depths=DEPTHS, dims=C0)))
    with pytest.raises(FileNotFoundError, match="local checkpoint path"):
        load_encoder_weights(model, tmp_path / "nope.pth")


def test_pickled_training_config(tmp_path):
    sd = official.vssm(depths=DEPTHS, dims=C0)
    path = _save(tmp_path, sd, args=argparse.Namespace(lr=1e-3))  # as the official Vim / VMamba files
    model = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0)
    with pytest.warns(UserWarning, match="weights_only=False"):
        load_encoder_weights(model, path)
    with pytest.raises(pickle.UnpicklingError):
        load_encoder_weights(model, path, weights_only=True)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_file_that_is_no_checkpoint_is_never_unpickled(tmp_path):
    """A text file (here a Git LFS pointer) got the "holds non-tensor objects" warning, a full unpickle and a
    bare `UnpicklingError: invalid load key, 'v'.`; a truncated file the raw miniz RuntimeError. Both name the
    file now, with the fix, and only a zip archive or a pickle stream ever loads with weights_only=False."""
    model = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0)
    sd = official.vssm(depths=DEPTHS, dims=C0)
    data = _save(tmp_path, sd).read_bytes()
    pointer = tmp_path / "pointer.pth"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 114000000\n")
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    for path, what in ((pointer, "is not a PyTorch checkpoint: it starts with b'version"), (half, "truncated")):
        for weights_only in (None, True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "loading it with weights_only=False"
                with pytest.raises(CorruptCheckpointError, match=re.escape(str(path)) + ".*" + re.escape(what)):
                    load_encoder_weights(model, path, weights_only=weights_only)
    p4 = tmp_path / "protocol4.pth"  # a real checkpoint whose opcodes weights_only=True cannot read
    torch.save({"model": sd}, p4, pickle_protocol=4)
    with pytest.warns(UserWarning, match="loading it with weights_only=False"):
        assert load_encoder_weights(model, p4).loaded


def test_timm_pretrained_file_and_own_state_dict_pass_through(tmp_path):
    sd = official.vssm(depths=DEPTHS, dims=C0)
    path = _save(tmp_path, sd)
    kw = dict(depths=DEPTHS, dims=C0, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    m = timm.create_model("vmamba_tiny", **kw)
    torch.testing.assert_close(m.head.bias, sd["classifier.head.bias"])
    from mamba_dense.integrations.timm import create_timm_model

    g = create_timm_model("vmamba_tiny", str(path), depths=DEPTHS, dims=C0)
    torch.testing.assert_close(g.stem.norm1.weight, sd["patch_embed.2.weight"])
    assert checkpoint_filter_fn(m.state_dict(), m).keys() == m.state_dict().keys()
    ours = tmp_path / "ours.pth"
    torch.save(m.state_dict(), ours)
    fresh = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0)
    assert not load_encoder_weights(fresh, ours).ignored
    torch.testing.assert_close(fresh.stages[2].blocks[1].op.ssm.A_logs, m.stages[2].blocks[1].op.ssm.A_logs)


def test_timm_and_smp_pretrained_files_load_strictly(tmp_path):
    """timm loads a features-only model with strict=False (its head differs from the file's), so a
    file of another model used to build with random weights and a log line (found by an exploratory
    run). The timm path now raises like load_encoder_weights, naming the file; the cases timm adapts
    by design (in_chans != 3, another number of classes, features_only) still load."""
    from mamba_dense.integrations.smp import create_smp_model

    sd = official.vssm(depths=DEPTHS, dims=C0)
    good = _save(tmp_path, sd)
    kw = dict(depths=DEPTHS, dims=C0, pretrained=True, pretrained_cfg_overlay=dict(file=str(good)))
    f = timm.create_model("vmamba_tiny", features_only=True, **kw)
    torch.testing.assert_close(f.model.stem.norm1.weight, sd["patch_embed.2.weight"])
    one = timm.create_model("vmamba_tiny", features_only=True, in_chans=1, **kw)  # first conv adapted
    assert one.model.stem.conv1.weight.shape[1] == 1
    torch.testing.assert_close(one.model.stem.conv1.weight[:, 0], sd["patch_embed.0.weight"].sum(1))
    ten = timm.create_model("vmamba_tiny", num_classes=10, **kw)  # classifier dropped, the rest loaded
    torch.testing.assert_close(ten.stem.norm1.weight, sd["patch_embed.2.weight"])

    unrelated = tmp_path / "unrelated.pth"
    torch.save({"model": {"foo.weight": torch.randn(3, 3)}}, unrelated)
    other = tmp_path / "other.pth"  # the same family at other depths
    torch.save({"model": official.vssm(depths=(1, 1, 1, 1), dims=C0)}, other)
    for path in (unrelated, other):
        kw["pretrained_cfg_overlay"] = dict(file=str(path))
        with pytest.raises(CheckpointMismatchError, match=str(path)):
            timm.create_model("vmamba_tiny", features_only=True, **kw)
    with pytest.raises(CheckpointMismatchError, match="unrelated.pth"):
        create_smp_model("fpn", "vmamba_tiny", classes=3, checkpoint=str(unrelated), depths=DEPTHS, dims=C0)


def test_timm_route_reads_files_like_load_encoder_weights(tmp_path):
    """The timm / smp / torchvision route read the file with timm's own loader: a file pickling its training
    config (as the official Vim and VMamba files) failed there with weights_only=True, and a file with "model"
    and "model_ema" gave the EMA weights where load_encoder_weights gives "model". One reader now."""
    from mamba_dense.integrations.timm import create_timm_model

    sd = official.vssm(depths=DEPTHS, dims=C0)
    path = _save(tmp_path, sd, args=argparse.Namespace(lr=1e-3))
    with pytest.warns(UserWarning, match="weights_only=False"):
        m = create_timm_model("vmamba_tiny", str(path), depths=DEPTHS, dims=C0, features_only=True)
    torch.testing.assert_close(m.model.stem.norm1.weight, sd["patch_embed.2.weight"])
    assert "state_dict" not in m.pretrained_cfg and "state_dict" not in m.model.pretrained_cfg  # not kept alive

    ema = {k: v + 1 for k, v in sd.items()}
    both = tmp_path / "both.pth"
    torch.save({"model": sd, "model_ema": ema}, both)
    t = create_timm_model("vmamba_tiny", str(both), depths=DEPTHS, dims=C0)
    fresh = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0)
    load_encoder_weights(fresh, both)
    torch.testing.assert_close(t.stem.norm1.weight, sd["patch_embed.2.weight"])
    torch.testing.assert_close(fresh.stem.norm1.weight, sd["patch_embed.2.weight"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_timm_model("vmamba_tiny", str(tmp_path / "missing.pth"), depths=DEPTHS, dims=C0)


def test_timm_route_keeps_a_classifier_of_the_models_size(tmp_path):
    """A 10-class file into a 10-class model: timm compared 10 with the cfg's 1000 and dropped the head."""
    from mamba_dense.integrations.timm import create_timm_model

    src = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0, num_classes=10)
    path = tmp_path / "ten.pth"
    torch.save(src.state_dict(), path)
    m = create_timm_model("vmamba_tiny", str(path), depths=DEPTHS, dims=C0, num_classes=10)
    torch.testing.assert_close(m.head.weight, src.head.weight)
    torch.testing.assert_close(m.head.bias, src.head.bias)
    other = create_timm_model("vmamba_tiny", str(path), depths=DEPTHS, dims=C0, num_classes=7)  # dropped
    assert other.head.weight.shape[0] == 7


def test_checkpoint_that_is_no_dict(tmp_path):
    model = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0)
    whole = tmp_path / "whole.pth"
    torch.save(enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0), whole)  # torch.save(model)
    with pytest.warns(UserWarning, match="weights_only=False"):
        assert load_encoder_weights(model, whole).loaded
    for name, obj in (("tensor.pth", torch.randn(3)), ("list.pth", [torch.randn(3)])):
        with pytest.raises(CheckpointMismatchError, match=re.escape(str(tmp_path / name)) + ".*not a state dict"):
            torch.save(obj, tmp_path / name)
            load_encoder_weights(model, tmp_path / name)


def test_three_channel_weights_into_another_number_of_input_channels(tmp_path):
    """load_encoder_weights (the tasks' encoder_weights) fits the stem as timm's loader does."""
    sd = official.vssm(depths=DEPTHS, dims=C0)
    path = _save(tmp_path, sd)
    for chans in (1, 5):
        model = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0, in_chans=chans)
        report = load_encoder_weights(model, path)
        assert report.adapted == ["stem.conv1.weight"]
        expect = timm.models.adapt_input_conv(chans, sd["patch_embed.0.weight"])
        torch.testing.assert_close(model.stem.conv1.weight, expect)
    # other channel counts in the file stay a shape mismatch naming the key (timm's helper raised bare errors)
    four = tmp_path / "four.pth"
    src = enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0, in_chans=4)
    torch.save(src.state_dict(), four)
    for chans in (1, 2):
        with pytest.raises(CheckpointMismatchError, match=r"stem.conv1.weight: file \(\d+, 4, 3, 3\)"):
            load_encoder_weights(enc.create_encoder("vmamba_tiny", depths=DEPTHS, dims=C0, in_chans=chans), four)


def test_timm_route_does_not_copy_the_checkpoint(tmp_path, monkeypatch):
    """timm deep-copies its cfg: a checkpoint put there was copied once (twice features-only) per build."""
    from mamba_dense.integrations.timm import create_timm_model

    path = _save(tmp_path, official.vssm(depths=DEPTHS, dims=C0))
    copies = []
    deepcopy = torch.Tensor.__deepcopy__
    monkeypatch.setattr(torch.Tensor, "__deepcopy__", lambda self, memo: (copies.append(1), deepcopy(self, memo))[1])
    m = create_timm_model("vmamba_tiny", str(path), depths=DEPTHS, dims=C0, features_only=True)
    assert not copies and m.model.stem.norm1.weight.abs().sum() > 0
