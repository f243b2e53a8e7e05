"""VolumetricSegmentationTask: shapes, losses, regions, Lightning fit/test/predict on the synthetic
MSD task, the demo and recipe configs through the CLI, and NIfTI round trips on real MSD spleen
and BraTS cases (written prediction on the input's grid: shape, affine, spacing)."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mamba_dense.datamodules import MedicalDecathlonDataModule, SyntheticVolumesDataModule
from mamba_dense.tasks import VolumetricSegmentationTask

REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = {
    "segmamba_tiny": dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), d_state=2),
    "vmamba3d_tiny": dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1)),
}
TINY_DECODER = [4, 8, 16, 16]


def _task(num_classes=3, encoder="segmamba_tiny", **kw) -> VolumetricSegmentationTask:
    torch.manual_seed(0)
    kw.setdefault("patch_size", (16, 16, 16))
    kw.setdefault("decoder_channels", TINY_DECODER)
    return VolumetricSegmentationTask(num_classes, encoder=encoder, encoder_kwargs=dict(TINY[encoder]), **kw)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path / "run"), **kw)


def _real(name: str) -> Path:
    p = REALDATA / name
    if not p.is_dir():
        pytest.skip(f"real sample data {p.resolve()} absent (../shared/realdata)")
    return p.resolve()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("encoder", sorted(TINY))
def test_forward_shapes_deep_supervision_and_backward(encoder):
    task = _task(encoder=encoder, deep_supervision=True, in_channels=2)
    x = torch.randn(2, 2, 20, 18, 13)  # odd, non-multiple sizes
    task.eval()
    assert task(x).shape == (2, 3, 20, 18, 13)
    task.train()
    outs = task(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(20, 18, 13), (10, 9, 7), (5, 5, 4)]
    label = torch.randint(0, 3, (2, 20, 18, 13))
    loss = sum(w * task._loss(o, label) for w, o in zip(task.ds_weights(3), outs))
    loss.backward()
    assert torch.isfinite(loss)
    unused = [n for n, p in task.named_parameters() if p.grad is None]
    assert not unused  # every parameter takes part (DDP without find_unused_parameters)
    assert task.ds_weights(3) == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75])


def test_regions_painting_masks_and_loss():
    task = _task(4, regions=[[1, 2, 3], [2, 3], [3]], region_names=["WT", "TC", "ET"], in_channels=4)
    assert task.out_channels == 3 and task.region_labels() == [1, 2, 3]
    assert task.structure_names() == ["WT", "TC", "ET"]
    label = torch.tensor([0, 1, 2, 3]).view(1, 1, 4).expand(4, 4, 4).clone()
    masks = task.target_masks(label)
    assert masks[:, 0, 0].tolist() == [[False, True, True, True], [False, False, True, True],
                                        [False, False, False, True]]
    probs = masks.float()  # a perfect region prediction paints the labels back
    assert torch.equal(task.to_labels(probs).long(), label)
    logits = torch.randn(2, 3, 8, 8, 8)
    assert torch.isfinite(task._loss(logits, torch.randint(0, 4, (2, 8, 8, 8))))
    # BraTS 2013 labels (1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing)
    brats = _task(5, regions=[[1, 2, 3, 4], [1, 3, 4], [4]], in_channels=2)
    assert brats.region_labels() == [2, 1, 4]
    with pytest.raises(ValueError, match="foreground labels"):
        _task(4, regions=[[0, 1]])


def test_fit_test_predict_on_synthetic_msd(tmp_path):
    dm = SyntheticVolumesDataModule(root=str(tmp_path / "task"), cache_dir=str(tmp_path / "cache"), num_cases=4,
                                    shape=(22, 20, 18), patch_size=(16, 16, 16), samples_per_volume=1)
    task = _task(deep_supervision=True, optimizer="sgd", results_dir=str(tmp_path / "results"),
                 predict_dir=str(tmp_path / "pred"), val_hd95=True)
    trainer = _trainer(tmp_path, fast_dev_run=1)
    trainer.fit(task, dm)
    assert {"train/loss", "val/dice", "val/dice_organ", "val/hd95_lesion"} <= set(trainer.callback_metrics)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and trainer.optimizers[0].defaults["nesterov"]

    trainer.test(task, dm)
    metrics = trainer.callback_metrics
    assert 0 <= float(metrics["test/dice"]) <= 1 and float(metrics["test/hd95"]) >= 0
    with open(tmp_path / "results" / "test_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["structure"] for r in rows] == ["organ", "lesion"] and rows[0]["case"].startswith("synth_")
    assert (tmp_path / "results" / "test_summary.csv").is_file()
    assert set(task.summary["test"]) == {"organ", "lesion"}

    out = _trainer(tmp_path).predict(task, dm)
    assert len(out) == 2  # the task's two unlabelled test volumes
    for paths in out:
        src = nib.load(tmp_path / "task" / "imagesTs" / (Path(paths["nifti"]).name))
        pred = nib.load(paths["nifti"])
        assert pred.shape == src.shape == (22, 20, 18)
        np.testing.assert_allclose(pred.affine, src.affine)
        assert pred.header.get_zooms() == src.header.get_zooms()
        assert pred.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
        png = np.asarray(Image.open(paths["montage"]))
        assert png.ndim == 3 and png.shape[2] == 3 and png.shape[0] > 100


def test_cli_demo_config_and_recipes(tmp_path):
    from mamba_dense.cli import build_cli

    demo = [
        "--config", str(CONFIGS / "demo" / "volumes.yaml"),
        f"--data.init_args.root={tmp_path / 'task'}", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.num_cases=3", "--data.init_args.shape=[20, 20, 20]",
        "--data.init_args.patch_size=[16, 16, 16]", "--model.init_args.patch_size=[16, 16, 16]",
        "--model.init_args.encoder_kwargs={dims: [8, 16, 16, 16], depths: [1, 1, 1, 1], d_state: 2}",
        "--model.init_args.decoder_channels=[4, 8, 16, 16]",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ]
    cli = build_cli(["fit", *demo, "--trainer.fast_dev_run=1"])
    assert type(cli.model).__name__ == "VolumetricSegmentationTask"
    assert "val/dice" in cli.trainer.callback_metrics
    for name, classes, channels, outputs in [("segmamba_tiny_spleen.yaml", 2, 1, 2),
                                             ("segmamba_tiny_braintumour.yaml", 4, 4, 3)]:
        cli = build_cli(["--config", str(CONFIGS / "msd" / name), "--trainer.accelerator=cpu",
                         f"--data.init_args.cache_dir={tmp_path / 'cache'}"], run=False)
        hp = cli.model.hparams
        assert (hp.num_classes, hp.in_channels, cli.model.out_channels) == (classes, channels, outputs)
        assert hp.encoder == "segmamba_tiny" and tuple(hp.patch_size) == (128, 128, 128)
        assert cli.model.encoder.dims == (48, 96, 192, 384)  # the released configuration
        assert cli.model.compile_mode == "reduce-overhead" and cli.model.channels_last
        assert cli.model.encoder.channels_last


def test_real_spleen_round_trip(tmp_path):
    spleen = _real("msd_spleen_ivadomed")
    before = _snapshot(spleen)
    image = spleen / "imagesTr" / "spleen_2.nii.gz"
    doc = json.loads((spleen / "dataset.json").read_text())
    doc["training"] = [{"image": str(image), "label": str(spleen / "labelsTr" / "spleen_2.nii.gz")}]
    doc["test"] = [str(image)]
    root = tmp_path / "Task09_Spleen"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(doc))
    src = nib.load(image)
    for target_spacing in (None, (5.0, 1.6, 1.6)):  # native grid, and resampled then restored
        dm = MedicalDecathlonDataModule(str(root), patch_size=(32, 96, 96), num_workers=0, cache_volumes=True,
                                        cache_dir=str(tmp_path / "cache"), target_spacing=target_spacing)
        out_dir = tmp_path / f"out_{target_spacing is not None}"
        task = _task(2, patch_size=(32, 96, 96), sw_batch_size=4, predict_dir=str(out_dir / "pred"),
                     results_dir=str(out_dir))
        trainer = _trainer(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one case: used for train and val
            trainer.test(task, dm)
            paths = trainer.predict(task, dm)[0]
        with open(out_dir / "test_per_case.csv") as f:
            rows = list(csv.DictReader(f))
        assert [(r["case"], r["structure"]) for r in rows] == [("spleen_2", "spleen")]
        assert int(rows[0]["gt_voxels"]) > 0 and np.isfinite(float(rows[0]["hd95"]))
        pred = nib.load(paths["nifti"])
        assert pred.shape == src.shape == (164, 166, 26)
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
        np.testing.assert_allclose(pred.header.get_zooms(), src.header.get_zooms())
        assert pred.header["sform_code"] == src.header["sform_code"]
        assert Path(paths["montage"]).is_file()
    assert _snapshot(spleen) == before


def test_real_brats_round_trip_with_regions(tmp_path):
    brats = _real("brats_deepmedic")
    before = _snapshot(brats)
    cases = ["brats_2013_pat0001_1", "brats_2013_pat0003_1"]

    def images(c):
        return [str(brats / c / "Flair_subtrMeanDivStd.nii.gz"), str(brats / c / "T1c_subtrMeanDivStd.nii.gz")]

    doc = {"name": "BraTS2013", "modality": {"0": "FLAIR", "1": "T1c"},
           "labels": {"0": "background", "1": "necrosis", "2": "edema", "3": "non-enhancing", "4": "enhancing"},
           "training": [{"image": images(c), "label": str(brats / c / "OTMultiClass.nii.gz")} for c in cases],
           "test": [{"image": images(c)} for c in cases]}
    root = tmp_path / "BraTS"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(doc))
    # resampled to 2 mm for speed (the CPU scan is the cost): predictions go back to the 1 mm file grid
    dm = MedicalDecathlonDataModule(str(root), patch_size=(48, 64, 64), num_workers=0, target_spacing=(2.0, 2.0, 2.0),
                                    cache_dir=str(tmp_path / "cache"))
    task = _task(5, in_channels=2, patch_size=(48, 64, 64), regions=[[1, 2, 3, 4], [1, 3, 4], [4]],
                 region_names=["whole_tumour", "tumour_core", "enhancing"], sw_overlap=0.0, sw_batch_size=2,
                 predict_dir=str(tmp_path / "pred"), results_dir=str(tmp_path / "results"))
    trainer = _trainer(tmp_path)
    trainer.test(task, dm)
    with open(tmp_path / "results" / "test_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["structure"] for r in rows] == ["whole_tumour", "tumour_core", "enhancing"]
    assert all(int(r["gt_voxels"]) > 0 for r in rows)
    out = trainer.predict(task, dm)
    assert len(out) == 2
    for case, paths in zip(cases, out):
        src = nib.load(brats / case / "Flair_subtrMeanDivStd.nii.gz")
        pred = nib.load(paths["nifti"])
        assert pred.shape == src.shape == (240, 240, 155)
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
        np.testing.assert_allclose(pred.header.get_zooms(), src.header.get_zooms())
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}  # region painting: 2, 1, 4
        assert case in os.path.basename(paths["montage"])
    assert _snapshot(brats) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_fit_and_test_full_size_encoder(tmp_path):
    # the released segmamba_tiny widths, bf16 autocast, Triton scan: one step and a whole-volume test
    dm = SyntheticVolumesDataModule(root=str(tmp_path / "task"), cache_dir=str(tmp_path / "cache"), num_cases=3,
                                    shape=(72, 64, 80), patch_size=(64, 64, 64), samples_per_volume=1)
    task = VolumetricSegmentationTask(3, patch_size=(64, 64, 64), deep_supervision=True,
                                      results_dir=str(tmp_path / "results"))
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", fast_dev_run=1, logger=False,
                         enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))
    trainer.fit(task, dm)
    trainer.test(task, dm)
    assert np.isfinite(float(trainer.callback_metrics["test/dice"]))
    assert (tmp_path / "results" / "test_per_case.csv").is_file()


def test_compile_mode_trains_like_eager(tmp_path, monkeypatch):
    """compile_mode: the first step at a patch shape runs eagerly, the later ones through one
    torch.compile'd forward (traced by Dynamo + AOTAutograd here; Inductor on a GPU); the losses of
    three SGD steps equal an eager run's. Evaluation stays eager; bad modes are refused."""
    monkeypatch.setattr(VolumetricSegmentationTask, "_compile_backend", "aot_eager")
    losses = {}
    for mode in (None, "reduce-overhead"):
        dm = SyntheticVolumesDataModule(root=str(tmp_path / "task"), cache_dir=str(tmp_path / "cache"), num_cases=3,
                                        shape=(18, 16, 16), patch_size=(16, 16, 16), samples_per_volume=2)
        task = _task(deep_supervision=True, optimizer="sgd", compile_mode=mode)
        seen = []
        task.on_train_batch_end = lambda outputs, batch, batch_idx, seen=seen: seen.append(float(outputs["loss"]))
        pl.seed_everything(0)
        trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(task, dm)
        losses[mode] = seen
        assert (task._compiled_forward is not None) == (mode is not None)
        assert "compile_mode" not in task.hparams  # a runtime option, not part of the checkpoint
    assert len(losses[None]) == 3 and all(np.isfinite(losses[None]))
    np.testing.assert_allclose(losses["reduce-overhead"], losses[None], rtol=1e-5)
    with pytest.raises(ValueError, match="compile_mode must be None or one of"):
        _task(compile_mode="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_training_matches_eager(tmp_path):
    """bf16, the released segmamba_tiny widths: steps through the Inductor-compiled forward replayed as
    CUDA graphs (compile_mode="reduce-overhead"), NCDHW and channels-last, track the eager run's losses."""
    losses = {}
    for mode, cl in ((None, False), ("reduce-overhead", False), ("reduce-overhead", True)):
        dm = SyntheticVolumesDataModule(root=str(tmp_path / "task"), cache_dir=str(tmp_path / "cache"), num_cases=3,
                                        shape=(40, 36, 44), patch_size=(32, 32, 32), samples_per_volume=2)
        torch.manual_seed(0)
        task = VolumetricSegmentationTask(3, patch_size=(32, 32, 32), deep_supervision=True, optimizer="sgd",
                                          compile_mode=mode, channels_last=cl)
        seen = []
        task.on_train_batch_end = lambda outputs, batch, batch_idx, seen=seen: seen.append(float(outputs["loss"]))
        pl.seed_everything(0)
        trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=4, logger=False,
                             limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                             enable_checkpointing=False, default_root_dir=str(tmp_path / "run"))
        trainer.fit(task, dm)
        losses[mode, cl] = seen
    eager = losses[None, False]
    assert len(eager) == 4 and all(np.isfinite(eager))
    # bf16 autocast: Inductor's fused kernels round differently from eager's, so close, not equal
    np.testing.assert_allclose(losses["reduce-overhead", False], eager, rtol=2e-2)
    np.testing.assert_allclose(losses["reduce-overhead", True], eager, rtol=2e-2)


@pytest.mark.parametrize("encoder", sorted(TINY))
def test_channels_last_gives_the_same_logits_and_gradients(encoder):
    """channels_last=True keeps weights, input and SegMamba's maps in NDHWC: same numbers as NCDHW, and
    the logits (deep-supervision ones too) come back contiguous."""
    base, cl = _task(encoder=encoder, deep_supervision=True), _task(encoder=encoder, deep_supervision=True,
                                                                    channels_last=True)
    cl.load_state_dict(base.state_dict())
    assert cl.decoder.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 17, 16, 18)
    label = torch.randint(0, 3, (2, 17, 16, 18))
    grads = []
    for task in (base, cl):
        outs = task(x)
        loss = sum(w * task._loss(o, label) for w, o in zip(task.ds_weights(3), outs))
        loss.backward()
        first_conv = next(m for m in task.encoder.modules() if isinstance(m, torch.nn.Conv3d))
        grads.append((outs[0].detach(), first_conv.weight.grad, task.decoder.head.weight.grad))
    assert grads[1][0].is_contiguous()  # logits back in NCDHW (the maps inside stay NDHWC)
    assert all(o.is_contiguous() for o in outs)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_deep_supervision_labels_sit_on_the_strided_voxels():
    """A stride-2 output's voxel j lies on input voxel 2j: 9 -> 5 takes 0, 2, 4, 6, 8 (nearest
    interpolation took 0, 1, 3, 5, 7 for odd sizes)."""
    from mamba_dense.tasks.volumetric import _downsample_labels

    label = torch.arange(9 * 6 * 7).reshape(1, 9, 6, 7)
    out = _downsample_labels(label, (5, 3, 4))
    assert torch.equal(out, label[:, ::2, ::2, ::2])
    assert torch.equal(_downsample_labels(label, (3, 2, 2)), label[:, ::3, ::3, ::4])
    odd = _downsample_labels(label, (4, 6, 7))  # 9 -> 4 is no stride: nearest
    assert odd.shape == (1, 4, 6, 7) and torch.equal(odd[0, :, 0, 0], label[0, [0, 2, 4, 6], 0, 0])
    # a known stride wins over the guess: 9 -> 3 is the stride-4 output (0, 4, 8), not every 3rd voxel
    assert torch.equal(_downsample_labels(label, (3, 2, 2), stride=4), label[:, ::4, ::4, ::4])


def test_deep_supervision_loss_takes_the_decoder_strides():
    """The training loss gives the stride-4 output the labels at 0, 4, 8 of a 9-voxel axis."""
    task = _task(2, patch_size=(9, 16, 16), deep_supervision=True)
    task.train()
    outs = task(torch.randn(1, 1, 9, 16, 16))
    assert [tuple(o.shape[2:]) for o in outs] == [(9, 16, 16), (5, 8, 8), (3, 4, 4)]
    label = torch.randint(0, 2, (1, 9, 16, 16))
    seen = []
    original = task._targets
    task._targets = lambda lab: (seen.append(lab.clone()), original(lab))[1]
    task.training_step({"image": torch.randn(1, 1, 9, 16, 16), "label": label}, 0)
    assert [tuple(s.shape[1:]) for s in seen] == [(9, 16, 16), (5, 8, 8), (3, 4, 4)]
    assert torch.equal(seen[1], label[:, ::2, ::2, ::2]) and torch.equal(seen[2], label[:, ::4, ::4, ::4])


def test_region_scores_are_those_of_the_written_label_map():
    """Sigmoid outputs that are not nested (TC or ET above 0.5 where WT is not): the scored WT mask
    is the painted map's labels 1-3, as in the file that predict writes."""
    task = _task(4, regions=[[1, 2, 3], [2, 3], [3]], region_names=["WT", "TC", "ET"], in_channels=4)
    probs = torch.zeros(3, 1, 1, 3)
    probs[:, 0, 0, 1] = torch.tensor([0.0, 0.9, 0.0])  # TC alone
    probs[:, 0, 0, 2] = torch.tensor([0.0, 0.0, 0.9])  # ET alone
    labels = task.to_labels(probs)
    assert labels[0, 0].tolist() == [0, 2, 3]
    masks = task.prediction_masks(probs)
    assert torch.equal(masks, task.target_masks(labels.long()))
    assert masks[0, 0, 0].tolist() == [False, True, True]  # WT holds both voxels


def test_default_case_names_count_cases(tmp_path):
    """Evaluation batches without a "name": case_0000, case_0001, ... whatever the number of structures."""
    task = _task(4)
    task.eval()
    for _ in range(3):
        batch = {"image": torch.randn(1, 1, 16, 16, 16), "label": torch.randint(0, 4, (1, 16, 16, 16))}
        with torch.no_grad():
            task._eval_step(batch, "val")
    names = [r.case for r in task._rows["val"]]
    assert sorted(set(names)) == ["case_0000", "case_0001", "case_0002"] and len(names) == 9


def test_written_label_map_drops_the_source_intent(tmp_path):
    from mamba_dense.tasks.volumetric import write_nifti_like

    affine = np.diag([0.9, 0.9, 2.5, 1.0])
    src = nib.Nifti1Image(np.random.default_rng(0).normal(size=(6, 5, 4, 3)).astype(np.float32), affine)
    src.header.set_intent("vector")
    nib.save(src, tmp_path / "src.nii.gz")
    labels = np.random.default_rng(1).integers(0, 3, (4, 5, 6)).astype(np.uint8)  # (D, H, W) = (z, y, x)
    geom = {"affine": affine, "common_shape": (4, 5, 6), "ornt": np.array([[0, 1], [1, 1], [2, 1]])}
    path = write_nifti_like(labels, geom, str(tmp_path / "out.nii.gz"), source=str(tmp_path / "src.nii.gz"))
    out = nib.load(path)
    assert out.header.get_intent()[0] == "none" and out.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(out.dataobj), labels.transpose(2, 1, 0))


def test_more_classes_than_a_uint8_label_map_holds():
    with pytest.raises(ValueError, match=r"num_classes=300: predicted label maps are written as uint8.*Fix"):
        VolumetricSegmentationTask(num_classes=300)
