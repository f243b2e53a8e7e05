"""MedicalDecathlonDataModule on a synthetic MSD task, the real MSD spleen case and BraTS/MONAI NIfTI files."""

from __future__ import annotations

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from mamba_dense.datamodules import (
    DataError, MedicalDecathlonDataModule, SyntheticVolumesDataModule, parse_dataset_json, save_prediction,
    write_msd_like,
)
from mamba_dense.datamodules._volume import nonzero_zscore, read_case, to_common_space


def _dm(root, cache, **kw) -> MedicalDecathlonDataModule:
    return MedicalDecathlonDataModule(str(root), num_workers=0, cache_dir=str(cache), **kw)


def test_synthetic_task_end_to_end(msd_root, tmp_path, snap):
    before = snap(msd_root)
    dm = _dm(msd_root, tmp_path / "cache", patch_size=(16, 16, 16), batch_size=3, samples_per_volume=3,
             cache_volumes=True)
    assert dm.num_classes == 3 and dm.class_names == ["background", "organ", "lesion"]
    assert dm.in_channels == 1 and dm.normalization == ["ct"]
    task = parse_dataset_json(msd_root)
    assert len(task.training) == 5 and len(task.test) == 1  # "._" junk files in imagesTr are not cases
    assert (msd_root / "imagesTr" / "._synth_000.nii.gz").exists()

    dm.prepare_data()
    stats_files = list((tmp_path / "cache").rglob("*.json"))
    assert len(stats_files) == 1 and stats_files[0].is_relative_to(tmp_path / "cache")
    mtime = stats_files[0].stat().st_mtime_ns
    dm.prepare_data()  # cached: not recomputed
    assert stats_files[0].stat().st_mtime_ns == mtime
    stats = dm.ct_stats()["0"]
    assert stats["p00_5"] < stats["mean"] < stats["p99_5"] and 60 < stats["mean"] < 200

    dm.setup("fit")
    train, val = dm.split()
    assert len(train) == 4 and len(val) == 1 and not {c.name for c in train} & {c.name for c in val}
    ds = dm.datasets["train"]
    assert len(ds) == 12 and ds.force_fg.sum() == 4  # exactly 1/3 of the patches centred on foreground
    torch.manual_seed(0)
    for i in np.flatnonzero(ds.force_fg):
        assert (ds[int(i)]["label"] > 0).any()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (3, 16, 16, 16) and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2}

    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["image"].shape == (1, 1, 20, 28, 24)  # (x, y, z) = (24, 28, 20) -> (D, H, W) = (z, y, x)
    assert val_batch["label"].shape == (1, 20, 28, 24)
    assert val_batch["spacing"][0].tolist() == [1.5, 1.0, 1.0]
    assert val_batch["original_shape"][0].tolist() == [24, 28, 20] and val_batch["affine"].shape == (1, 4, 4)
    assert val_batch["path"][0].endswith(".nii.gz") and val_batch["name"][0].startswith("synth_")
    assert snap(msd_root) == before


def test_reorientation_and_save_round_trip(msd_root, tmp_path):
    dm = _dm(msd_root, tmp_path / "cache", augment=False)
    item = dm._get("val")[0]
    path = dm.split()[1][0].label
    ref = nib.load(path)
    # common orientation RAS: same voxels as nibabel's closest canonical, as (z, y, x)
    canon = np.asarray(nib.as_closest_canonical(ref).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(item["label"].numpy(), canon)
    out = save_prediction(item["label"], item, tmp_path / "pred" / "case.nii.gz")
    saved = nib.load(out)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_allclose(saved.affine, ref.affine)


def test_resampling_to_target_spacing(msd_root, tmp_path):
    dm = _dm(msd_root, tmp_path / "cache", target_spacing=(3.0, 2.0, 2.0))
    item = dm._get("val")[0]
    assert tuple(item["image"].shape[1:]) == (10, 14, 12)
    assert item["spacing"].tolist() == pytest.approx([3.0, 2.0, 2.0])
    restored = nib.load(save_prediction(item["label"], item, tmp_path / "p.nii.gz"))
    ref = np.asarray(nib.load(dm.split()[1][0].label).dataobj)
    got = np.asarray(restored.dataobj)
    assert got.shape == ref.shape
    dice = 2 * ((got > 0) & (ref > 0)).sum() / ((got > 0).sum() + (ref > 0).sum())
    assert dice > 0.8


def test_multimodal_mr_normalization(tmp_path):
    root = write_msd_like(tmp_path / "mr", num_cases=2, num_test=0, shape=(16, 16, 12), modalities=("FLAIR", "T1w"))
    image = nib.load(root / "imagesTr" / "synth_000.nii.gz")
    assert image.shape == (16, 16, 12, 2)  # MSD: modalities last
    dm = _dm(root, tmp_path / "cache")
    assert dm.in_channels == 2 and dm.normalization == ["zscore_nonzero", "zscore_nonzero"]
    dm.prepare_data()
    assert not (tmp_path / "cache").exists()  # nothing to cache without CT
    item = dm._get("val")[0]
    x = item["image"].numpy()
    assert x.shape == (2, 12, 16, 16)
    raw = np.asarray(image.dataobj)
    for c in range(2):
        fg = x[c] != 0
        assert abs(x[c][fg].mean()) < 1e-4 and abs(x[c][fg].std() - 1) < 1e-3
        assert fg.sum() == (raw[..., c] != 0).sum()  # zero background stays zero


def test_real_spleen_msd(spleen_real, tmp_path, snap):
    before = snap(spleen_real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one case: used for train and val
        dm = _dm(spleen_real, tmp_path / "cache", patch_size=(32, 64, 64), samples_per_volume=3, cache_volumes=True)
        dm.prepare_data()
        dm.setup("fit")
    stats = dm.ct_stats()["0"]
    assert -1024 <= stats["p00_5"] < stats["mean"] < stats["p99_5"] <= 1000  # spleen ~ 40-140 HU
    assert dm.class_names == ["background", "spleen"]
    torch.manual_seed(0)
    ds = dm.datasets["train"]
    for i in range(len(ds)):
        patch = ds[i]
        assert patch["image"].shape == (1, 32, 64, 64)  # 26 slices padded to 32
        if ds.force_fg[i]:
            assert (patch["label"] == 1).any()
    item = dm.datasets["val"][0]
    assert item["image"].shape == (1, 26, 166, 164)
    assert item["label"].unique().tolist() == [0, 1] and item["label"].dtype == torch.int64
    assert item["spacing"].tolist() == pytest.approx([5.0, 0.794922, 0.794922], rel=1e-5)
    ref = nib.load(spleen_real / "labelsTr" / "spleen_2.nii.gz")
    saved = nib.load(save_prediction(item["label"], item, tmp_path / "spleen_2.nii.gz"))
    np.testing.assert_array_equal(np.asarray(saved.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_allclose(saved.affine, ref.affine, atol=1e-5)
    with pytest.raises(ValueError, match="inside the dataset folder"):
        _dm(spleen_real, spleen_real / "cache")
    assert snap(spleen_real) == before


def test_real_brats_multifile_modalities(brats_real, tmp_path, recwarn):
    cases = ["brats_2013_pat0001_1", "brats_2013_pat0003_1"]
    doc = {"name": "BraTS2013", "modality": {"0": "FLAIR", "1": "T1c"},
           "labels": {"0": "background", "1": "necrosis", "2": "edema", "3": "non-enhancing", "4": "enhancing"},
           "training": [{"image": [str(brats_real / c / "Flair_subtrMeanDivStd.nii.gz"),
                                   str(brats_real / c / "T1c_subtrMeanDivStd.nii.gz")],
                         "label": str(brats_real / c / "OTMultiClass.nii.gz")} for c in cases]}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    dm = _dm(tmp_path, tmp_path.parent / (tmp_path.name + "_cache"))
    task = dm.task
    assert [c.name for c in task.training] == [f"{c}_Flair_subtrMeanDivStd" for c in cases]
    item = dm._get("val")[0]
    assert item["image"].shape == (2, 155, 240, 240) and item["image"].dtype == torch.float32
    assert item["label"].unique().tolist() == [0, 1, 2, 3, 4]  # float32 labels on disk, integral: no warning
    assert nib.load(brats_real / cases[0] / "OTMultiClass.nii.gz").get_data_dtype() == np.float32
    assert not [w for w in recwarn.list if "non-integer" in str(w.message)]
    assert item["spacing"].tolist() == [1.0, 1.0, 1.0]


def test_real_nifti_orientations(monai_real):
    img = nib.load(monai_real / "anatomical.nii")
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    image, label, affine = read_case([monai_real / "anatomical.nii"], monai_real / "anatomical_label.nii.gz", 1, 2)
    assert image.shape == (33, 41, 25, 1) and label.dtype == np.int64 and label.sum() == 330
    x, y, geom = to_common_space(image, label, affine)
    canon = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32).transpose(2, 1, 0)
    np.testing.assert_array_equal(x[0], canon)
    assert geom["spacing"].tolist() == [2.0, 2.0, 2.0] and y.sum() == 330
    z = nonzero_zscore(x[0])
    assert abs(z[x[0] != 0].mean()) < 1e-4


def test_synthetic_datamodule_writes_once(tmp_path, snap):
    dm = SyntheticVolumesDataModule(root=str(tmp_path / "vol"), cache_dir=str(tmp_path / "cache"), num_cases=3,
                                    shape=(20, 20, 20), patch_size=(16, 16, 16))
    assert dm.num_classes == 3  # reading the classes writes the task first
    dm.prepare_data()
    before = snap(tmp_path / "vol")
    dm.prepare_data()
    dm.setup("fit")
    assert snap(tmp_path / "vol") == before
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16)
    pred = next(iter(dm.predict_dataloader()))
    assert "label" not in pred and pred["image"].shape == (1, 1, 20, 20, 20)


def _copy_task(msd_root, tmp_path):
    root = tmp_path / "task"
    shutil.copytree(msd_root, root)
    return root


def test_bad_inputs(msd_root, tmp_path, snap):
    before = snap(msd_root)
    cache = tmp_path / "cache"
    root = _copy_task(msd_root, tmp_path)
    doc = json.loads((root / "dataset.json").read_text())

    (root / "dataset.json").write_text("{\"name\": \"x\",")
    with pytest.raises(DataError, match=r"dataset\.json: line 1 column \d+: malformed JSON.*Fix"):
        _dm(root, cache).task
    (root / "dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"dataset\.json not found.*Fix"):
        _dm(root, cache).task

    bad = json.loads(json.dumps(doc))
    bad["training"][1]["label"] = "./labelsTr/missing.nii.gz"
    (root / "dataset.json").write_text(json.dumps(bad))
    with pytest.raises(FileNotFoundError, match=r"missing\.nii\.gz: listed in .*training\[1\]\.label.*Fix"):
        _dm(root, cache).task

    bad = json.loads(json.dumps(doc))
    del bad["modality"]
    (root / "dataset.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="modality: missing"):
        _dm(root, cache).task

    bad = json.loads(json.dumps(doc))
    bad["labels"] = {"0": "background", "2": "lesion"}
    (root / "dataset.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"labels: ids \[0, 2\]"):
        _dm(root, cache).task

    # label values out of range, image/label shape mismatch, wrong dims, truncated file
    (root / "dataset.json").write_text(json.dumps(doc))
    case = root / doc["training"][0]["label"]
    ref = nib.load(case)
    lab = np.asarray(ref.dataobj).copy()
    lab[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lab, ref.affine), case)
    with pytest.raises(DataError, match=r"synth_000\.nii\.gz: voxel values: values \[7\].*0\.\.2"):
        read_case([root / doc["training"][0]["image"]], case, 1, 3)
    nib.save(nib.Nifti1Image(lab[:-2], ref.affine), case)
    with pytest.raises(DataError, match=r"shape: label \(22, 28, 20\) vs image"):
        read_case([root / doc["training"][0]["image"]], case, 1, 3)
    img_path = root / doc["training"][0]["image"]
    img = nib.load(img_path)
    nib.save(nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 3, -1), img.affine), img_path)
    with pytest.raises(DataError, match=r"dim: image shape \(24, 28, 20, 3\).*1 modality"):
        read_case([img_path], None, 1, 3)
    img_path.write_bytes(img_path.read_bytes()[:300])
    with pytest.raises(DataError, match="NIfTI header/data: cannot read"):
        read_case([img_path], None, 1, 3)
    assert snap(msd_root) == before


def test_missing_root_names_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Task99: task folder not found\. Expected layout: .*dataset\.json, "
                                                r".*imagesTr/\*\.nii\.gz, .*labelsTr/\*\.nii\.gz\. Fix: `root`"):
        _dm(tmp_path / "Task99", tmp_path / "cache").setup("fit")


def _case(msd_root, tmp_path):
    root = _copy_task(msd_root, tmp_path)
    doc = json.loads((root / "dataset.json").read_text())
    return root, root / doc["training"][0]["image"], root / doc["training"][0]["label"]


def test_affine_mismatch_raises(msd_root, tmp_path):
    root, img_path, lbl_path = _case(msd_root, tmp_path)
    lab = nib.load(lbl_path)
    data = np.asarray(lab.dataobj)
    shifted = lab.affine.copy()
    shifted[:3, 3] += 5.0  # same shape, another origin
    nib.save(nib.Nifti1Image(data, shifted), lbl_path)
    with pytest.raises(DataError, match=r"labelsTr/synth_000\.nii\.gz: affine: differs from image synth_000\.nii\.gz's "
                                        r"\(max difference 5\).*Fix"):
        read_case([img_path], lbl_path, 1, 3)
    scaled = lab.affine.copy()
    scaled[2, 2] *= 2  # another spacing
    nib.save(nib.Nifti1Image(data, scaled), lbl_path)
    with pytest.raises(DataError, match="affine: differs"):
        read_case([img_path], lbl_path, 1, 3)
    # two modalities of one case on different grids
    img = nib.load(img_path)
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), other)
    with pytest.raises(DataError, match=r"other\.nii\.gz: affine: differs from synth_000\.nii\.gz's"):
        read_case([img_path, other], None, 2, 3)


def test_label_stored_with_flipped_or_permuted_axes_is_reoriented(msd_root, tmp_path):
    """The same voxel grid stored in another axis order or direction (an LAS label next to an RAS image)
    is reoriented losslessly; it was rejected as "another voxel grid" with a fix (re-save it with the
    image's affine) that would have mirrored the label (found by an exploratory run)."""
    root, img_path, lbl_path = _case(msd_root, tmp_path)
    lab = nib.load(lbl_path)
    data = np.asarray(lab.dataobj)
    _, ref, _ = read_case([img_path], lbl_path, 1, 3)
    n0 = data.shape[0]
    flip0 = np.array([[-1, 0, 0, n0 - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    swap01 = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    for arr, aff in ((data[::-1], lab.affine @ flip0), (data.transpose(1, 0, 2), lab.affine @ swap01),
                     (data[::-1].transpose(1, 0, 2), lab.affine @ flip0 @ swap01)):
        assert nib.aff2axcodes(aff) != nib.aff2axcodes(lab.affine)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), aff), lbl_path)
        _, label, _ = read_case([img_path], lbl_path, 1, 3)
        np.testing.assert_array_equal(label, ref)
    assert len(np.unique(ref)) > 1  # the label is not constant (a flip would go unnoticed)


def test_float_labels_rounded_with_warning(msd_root, tmp_path, recwarn):
    root, img_path, lbl_path = _case(msd_root, tmp_path)
    lab = nib.load(lbl_path)
    data = np.asarray(lab.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(data, lab.affine), lbl_path)  # float32 but integral (as BraTS): silent
    _, y, _ = read_case([img_path], lbl_path, 1, 3)
    assert y.dtype == np.int64 and np.array_equal(y, data.astype(np.int64)) and not recwarn.list
    noisy = data.copy()
    noisy[data == 1] = 1.2
    noisy[0, 0, 0] = 1.8
    nib.save(nib.Nifti1Image(noisy, lab.affine), lbl_path)
    with pytest.warns(UserWarning, match=r"synth_000\.nii\.gz: voxel values: \d+ non-integer label value\(s\) "
                                         r"\[1\.2.*1\.8.*\] rounded"):
        _, y, _ = read_case([img_path], lbl_path, 1, 3)
    assert y[0, 0, 0] == 2 and (y[data == 1] == 1).all() and y.dtype == np.int64
    noisy[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(noisy, lab.affine), lbl_path)
    with pytest.raises(DataError, match="NaN or infinite"):
        read_case([img_path], lbl_path, 1, 3)


def test_dataset_json_missing_files_skipped_and_counted(msd_root, tmp_path):
    root = _copy_task(msd_root, tmp_path)
    doc = json.loads((root / "dataset.json").read_text())
    (root / doc["training"][2]["label"]).unlink()
    (root / doc["test"][0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"listed in .*training\[2\]\.label but not found.*on_missing='skip'"):
        _dm(root, tmp_path / "cache").task
    dm = _dm(root, tmp_path / "cache", on_missing="skip", patch_size=(16, 16, 16))
    with pytest.warns(UserWarning, match=r"MSD task .*skipped 2 item\(s\): 1 training case file missing .*"
                                         r"1 test case file missing"):
        dm.setup("fit")
    assert dm.skipped == {"training_case_file_missing": 1, "test_case_file_missing": 1}
    assert len(dm.task.training) == 4 and dm.task.test == []
    loader = MedicalDecathlonDataModule(str(root), cache_dir=str(tmp_path / "cache"), on_missing="skip", num_workers=1,
                                        pin_memory=True, persistent_workers=False, prefetch_factor=3).val_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor) == (1, True, False, 3)


@pytest.mark.parametrize("kw, match", [
    ({"orientation": "RLS"}, r"orientation='RLS': expected 3 axis codes naming each of L/R, A/P and S/I once"),
    ({"orientation": "SSS"}, r"orientation='SSS'"),
    ({"orientation": "RA"}, r"orientation='RA'"),
    ({"target_spacing": (-2.0, 1.5, 1.5)}, r"target_spacing=\(-2\.0, 1\.5, 1\.5\): expected 3 finite spacings > 0"),
    ({"target_spacing": (0.0, 1.5, 1.5)}, r"target_spacing=\(0\.0, 1\.5, 1\.5\)"),
    ({"target_spacing": (1.5, 1.5)}, r"target_spacing=\(1\.5, 1\.5\)"),
    ({"patch_size": (0, 16, 16)}, r"patch_size=\(0, 16, 16\): expected 3 positive integers"),
    ({"val_fraction": 0.0}, r"val_fraction=0\.0: expected a share in \(0, 1\) of the training list\."),
])
def test_geometry_arguments_checked(msd_root, tmp_path, kw, match):
    """A repeated axis code (a typo such as 'RLS') skipped the reorientation and reported an
    uninitialized spacing; a negative spacing squeezed the volume to one slice."""
    with pytest.raises(ValueError, match=match + r".*Fix"):
        _dm(msd_root, tmp_path / "cache", **kw)
    if "orientation" in kw:  # the volume reader checks as well
        with pytest.raises(ValueError, match=match):
            to_common_space(np.ones((4, 5, 6, 1), np.float32), None, np.diag([-0.8, -0.8, 5.0, 1.0]), kw["orientation"])
    assert _dm(msd_root, tmp_path / "cache", orientation="lps").orientation == "LPS"


def test_case_names_unique_and_cases_listed_once(msd_root, tmp_path):
    """BraTS-style folders (sub-01/anat/T1w.nii.gz) gave two cases one name: predict overwrote one
    file with the other."""
    root = _copy_task(msd_root, tmp_path)
    doc = json.loads((root / "dataset.json").read_text())
    src = root / doc["test"][0]
    doc["test"] = []
    for sub in ("sub-01", "sub-02"):
        (root / sub / "anat").mkdir(parents=True)
        shutil.copy(src, root / sub / "anat" / "T1w.nii.gz")
        doc["test"].append(f"./{sub}/anat/T1w.nii.gz")
    doc["test"].append(f"./imagesTs/{src.name}")
    (root / "dataset.json").write_text(json.dumps(doc))
    names = [c.name for c in _dm(root, tmp_path / "cache").task.test]
    assert names == ["sub-01_anat_T1w", "sub-02_anat_T1w", src.name.replace(".nii.gz", "")]

    doc["training"].append(dict(doc["training"][0]))
    (root / "dataset.json").write_text(json.dumps(doc))
    n = len(doc["training"]) - 1
    with pytest.raises(DataError, match=rf"training\[{n}\]: lists the same image as training\[0\].*list every case once"):
        _dm(root, tmp_path / "cache").task

    doc["training"].pop()
    doc["modality"] = {"0": "CT", "2": "CT"}
    (root / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"modality: channel indices \[0, 2\] are not 0\.\.1"):
        _dm(root, tmp_path / "cache").task


def test_ct_statistics_travel_with_the_checkpoint(msd_root, tmp_path):
    """The statistics were recomputed from the live training list: after it changed, the same
    model saw differently normalized inputs, silently."""
    root = _copy_task(msd_root, tmp_path)
    trained = _dm(root, tmp_path / "cache")
    state = trained.state_dict()
    assert set(state["ct_stats"]) == {"0"} and state["ct_stats"]["0"] == trained.ct_stats()["0"]
    before = trained._get("predict")[0]["image"]

    doc = json.loads((root / "dataset.json").read_text())
    doc["training"] = doc["training"][:2]  # the training set changes after training
    (root / "dataset.json").write_text(json.dumps(doc))
    later = _dm(root, tmp_path / "cache")
    later.setup("predict")  # Lightning builds the datasets, then restores the datamodule's state
    assert later.ct_stats() != trained.ct_stats()
    with pytest.warns(UserWarning, match=r"CT statistics of the current training cases differ .* the checkpoint's are used"):
        later.load_state_dict(state)
    assert later.ct_stats() == trained.ct_stats()
    assert torch.equal(later._get("predict")[0]["image"], before)


def test_mr_normalized_before_resampling(tmp_path):
    """nnU-Net's order: the nonzero mask of an MR channel is the acquired one, not the one blurred
    by trilinear resampling."""
    root = write_msd_like(tmp_path / "mr", num_cases=2, num_test=0, shape=(16, 16, 12), modalities=("FLAIR",))
    dm = _dm(root, tmp_path / "cache", target_spacing=(3.0, 2.0, 2.0))
    case = dm.split()[1][0]
    x = dm._get("val")[0]["image"].numpy()
    raw, label, affine = read_case(case.images, case.label, 1, dm.num_classes)
    expected, _, _ = to_common_space(nonzero_zscore(raw[..., 0])[..., None], label, affine, "RAS", (3.0, 2.0, 2.0))
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-5)
    blurred, _, _ = to_common_space(raw, label, affine, "RAS", (3.0, 2.0, 2.0))
    assert np.abs(nonzero_zscore(blurred[0]) - x[0]).max() > 1e-2  # the old order differs


def test_geometry_survives_half_precision_runs(msd_root, tmp_path):
    """precision="16-true" / "bf16-true" cast every floating tensor of a batch: the affine lost its
    translation's decimals (fp16) or could not be written (bf16). Evaluation batches keep the
    geometry as float64 numpy arrays, which Lightning leaves alone."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    dm = _dm(msd_root, tmp_path / "cache")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    item = dm._get("test")[0]
    for precision in ("16-true", "bf16-true"):
        cast = HalfPrecision(precision).convert_input(dict(batch))
        assert cast["image"].dtype != torch.float32  # the image is cast, as Lightning does
        assert cast["affine"].dtype == np.float64 and np.array_equal(cast["affine"][0], item["affine"].numpy())
        path = save_prediction(torch.zeros(tuple(cast["image"].shape[-3:]), dtype=torch.uint8), cast, tmp_path / "p.nii.gz")
        assert np.allclose(nib.load(path).affine, item["affine"].numpy(), atol=1e-5)
