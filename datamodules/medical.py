"""3D medical volumes in the Medical Segmentation Decathlon (MSD) layout.

Layout (``root`` is the task folder)::

    dataset.json      modality, labels, training [{"image", "label"}], test [...]
    imagesTr/*.nii.gz labelsTr/*.nii.gz imagesTs/*.nii.gz

File lists come from ``dataset.json`` only (the official archives also hold ``._*.nii.gz``
junk). CT channels are clipped to the 0.5/99.5 foreground percentiles and z-scored with
dataset statistics (computed once by ``prepare_data``, cached in ``cache_dir``, never in
``root``, and saved in checkpoints); other modalities get a per-image z-score over nonzero
voxels. Then (nnU-Net's order) volumes are reoriented to ``orientation`` (RAS) and optionally
resampled to ``target_spacing``.

Training batches: ``image`` (B, C, D, H, W) float32 and ``label`` (B, D, H, W) int64 patches.
Validation/test batches (batch size 1): whole volumes plus ``affine``, ``ornt``, ``spacing``,
``original_shape``, ``common_shape``, ``path`` and ``name``; ``save_prediction`` writes a
predicted (D, H, W) class map back as NIfTI on the original voxel grid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._common import (
    DataError, WorkerSeeded, check_choice, check_number, check_outside, check_sizes, default_cache_dir, is_file,
    make_loader, read_json, report_skipped,
)
from ._volume import (
    CaseGeometry, check_orientation, check_spacing, ct_normalize, intensity_augment, nonzero_zscore, random_flip,
    read_case, restore_original_space, sample_patch, to_common_space,
)
from .synthetic import write_msd_like

__all__ = ["MSDTask", "MedicalDecathlonDataModule", "PatchDataset", "SyntheticVolumesDataModule",
           "VolumeDataset", "parse_dataset_json", "save_prediction"]

_MAX_FG_VOXELS = 10_000  # foreground locations kept per class and case (as nnU-Net)


@dataclass
class Case:
    name: str
    images: list[Path]
    label: Path | None


@dataclass
class MSDTask:
    """A parsed ``dataset.json``: modalities per channel, class names by label id, cases."""

    json_path: Path
    name: str
    modalities: list[str]
    class_names: list[str]
    training: list[Case]
    test: list[Case]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> entries dropped (on_missing="skip")


def _resolve(root: Path, rel: Any, json_path: Path, where: str, must_exist: bool = True) -> Path:
    if not isinstance(rel, str) or not rel:
        raise DataError(json_path, where, f"expected a file path string, got {rel!r}", "fix the entry")
    p = Path(rel)
    try:
        p = p.expanduser()
    except RuntimeError:  # "~unknown_user/...": kept as written, then reported missing
        pass
    p = p if p.is_absolute() else root / p
    if must_exist and not is_file(p):
        raise FileNotFoundError(f"{p}: listed in {json_path} {where} but not found. "
                                "Fix: restore the file or remove the entry from dataset.json")
    return p


def parse_dataset_json(root: str | Path, on_missing: str = "error") -> MSDTask:
    """Read and check ``root/dataset.json`` (MSD v1; nnU-Net v2 ``channel_names``/name->id labels too).

    Entries naming missing files raise (``on_missing="error"``) or are dropped with their case
    (``"skip"``; listed in ``skipped`` of the result).
    """
    check_choice("on_missing", on_missing, ("error", "skip"))
    root = Path(root).expanduser()
    path = root / "dataset.json"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: task folder not found. Expected layout: {root}/dataset.json, "
                                f"{root}/imagesTr/*.nii.gz, {root}/labelsTr/*.nii.gz. Fix: `root`")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset.json not found. Fix: point `root` at the MSD task folder "
                                "(the one holding dataset.json, imagesTr/ and labelsTr/)")
    doc = read_json(path, "dataset.json")
    if not isinstance(doc, dict):
        raise DataError(path, "top level", "not a JSON object", "use an MSD dataset.json")
    mod = doc.get("modality", doc.get("channel_names"))
    if not isinstance(mod, dict) or not mod:
        raise DataError(path, "modality", "missing or empty", 'add e.g. "modality": {"0": "CT"}')
    try:
        modalities = [str(mod[k]) for k in sorted(mod, key=int)]
    except ValueError:
        raise DataError(path, "modality", f"keys {list(mod)} are not channel indices", 'use {"0": "CT", ...}') from None
    if sorted(int(k) for k in mod) != list(range(len(mod))):
        raise DataError(path, "modality", f"channel indices {sorted(int(k) for k in mod)} are not 0..{len(mod) - 1}",
                        "number the channels 0, 1, ... in the order of the image files / the 4th image axis")
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(path, "labels", "missing or empty", 'add e.g. "labels": {"0": "background", "1": "organ"}')
    try:
        if all(str(k).isdecimal() for k in labels):  # isdecimal, not isdigit: int("²") fails
            by_id = {int(k): str(v) for k, v in labels.items()}
        elif all(isinstance(v, int) for v in labels.values()):
            by_id = {int(v): str(k) for k, v in labels.items()}
        else:
            raise ValueError("neither id -> name nor name -> int id")
    except ValueError as e:  # also ids too long for int()
        raise DataError(path, "labels", str(e)[:120],
                        'use {"0": "background", "1": ...} (region labels are not supported)') from None
    if len(by_id) != len(labels):
        raise DataError(path, "labels", f"{len(labels)} entries but only {len(by_id)} distinct ids (e.g. \"1\" and "
                        "\"01\")", "give every class its own id")
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(path, "labels", f"ids {sorted(by_id)} are not 0..{len(by_id) - 1}",
                        "number the classes contiguously from 0 (background)")
    training = doc.get("training")
    if not isinstance(training, list) or not training:
        raise DataError(path, "training", "missing or empty", 'list the cases: [{"image": ..., "label": ...}]')
    skipped: dict[str, list[str]] = {"training_case_file_missing": [], "test_case_file_missing": []}

    def resolve_all(rels: list[Any], where: str, group: str) -> list[Path] | None:
        if not rels:
            raise DataError(path, where, "empty list of files", "list one file per modality")
        paths = [_resolve(root, r, path, where, must_exist=False) for r in rels]
        absent = [p for p in paths if not is_file(p)]
        if not absent:
            return paths
        if on_missing == "error":
            raise FileNotFoundError(f"{absent[0]}: listed in {path} {where} but not found. Fix: restore the "
                                    "file, remove the entry from dataset.json, or pass on_missing='skip'")
        skipped[f"{group}_case_file_missing"].extend(str(p) for p in absent)
        return None

    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(path, f"training[{i}]", "expected an object with 'image' and 'label'", "fix the entry")
        imgs = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = resolve_all(imgs, f"training[{i}].image", "training")
        label = resolve_all([entry["label"]], f"training[{i}].label", "training")
        if images is not None and label is not None:
            cases.append(Case(_case_name(images[0]), images, label[0]))
    if not cases:
        raise DataError(path, "training", f"no case with all its files present ({skipped['training_case_file_missing'][:3]}"
                        " missing)", "restore the files listed in dataset.json")
    if not isinstance(doc.get("test") or [], list):
        raise DataError(path, "test", f"expected a list of image paths, got {type(doc['test']).__name__}",
                        'use "test": ["./imagesTs/case.nii.gz", ...] or leave it out')
    test = []
    for i, entry in enumerate(doc.get("test") or []):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        imgs = rel if isinstance(rel, list) else [rel]
        images = resolve_all(imgs, f"test[{i}]", "test")
        if images is not None:
            test.append(Case(_case_name(images[0]), images, None))
    for group, key in ((cases, "training"), (test, "test")):
        _unique_names(group, path, key)
    name = str(doc.get("name") or root.name)
    return MSDTask(path, name, modalities, [by_id[k] for k in range(len(by_id))], cases, test, skipped)


def _case_name(path: Path) -> str:
    return re.sub(r"(_0000)?\.nii(\.gz)?$", "", path.name)


def _unique_names(group: list[Case], path: Path, key: str) -> None:
    """Case names (prediction files, per-case rows) unique within ``group``: one file per case
    folder (BraTS-style ``sub-01/anat/T1w.nii.gz``) repeats file names, so parent folders are
    prefixed until no two names collide. The same image listed twice is an error (the case
    could land in training and validation at once)."""
    first: dict[Path, int] = {}
    for i, c in enumerate(group):
        j = first.setdefault(c.images[0].resolve(), i)
        if j != i:
            raise DataError(path, f"{key}[{i}]", f"lists the same image as {key}[{j}] ({c.images[0]})",
                            "list every case once")
    depth = [0] * len(group)
    while True:
        by_name: dict[str, list[int]] = {}
        for i, c in enumerate(group):
            by_name.setdefault(c.name, []).append(i)
        clashes = [ids for ids in by_name.values() if len(ids) > 1]
        if not clashes:
            return
        for ids in clashes:
            for i in ids:
                c = group[i]
                parents = [p for p in c.images[0].parent.parts if p != c.images[0].anchor]
                depth[i] += 1
                if depth[i] > len(parents):  # x.nii and x.nii.gz, or x_0000.nii.gz and x.nii.gz, in one folder
                    j = next(j for j in ids if j != i)
                    raise DataError(path, f"{key}[{i}]", f"{c.images[0]} and {key}[{j}]'s {group[j].images[0]} "
                                    f"give the same case name {c.name!r}", "rename one of the files")
                c.name = "_".join([*parents[-depth[i]:], _case_name(c.images[0])])


class CaseLoader:
    """Loads, reorients, resamples and normalizes cases; optionally keeps them in memory."""

    def __init__(self, task: MSDTask, orientation: str, target_spacing: Sequence[float] | None,
                 ct_stats: dict[str, dict[str, float]] | None, cache_volumes: bool) -> None:
        self.task, self.orientation, self.target_spacing = task, orientation, target_spacing
        self.ct_stats, self.cache_volumes = ct_stats or {}, cache_volumes
        self._cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def load(self, case: Case) -> dict[str, Any]:
        key = tuple(str(p) for p in case.images)
        if key in self._cache:
            return self._cache[key]
        image, label, affine = read_case(case.images, case.label, len(self.task.modalities), len(self.task.class_names))
        # normalized on the file's grid, then resampled (nnU-Net's order): the nonzero-voxel mask of
        # MR channels is the acquired one, not one blurred by trilinear resampling
        image = np.asarray(image, np.float32)
        for c, modality in enumerate(self.task.modalities):
            if modality.upper() == "CT":
                if str(c) not in self.ct_stats:
                    raise RuntimeError("CT statistics missing: call prepare_data() (or setup()) first")
                image[..., c] = ct_normalize(image[..., c], self.ct_stats[str(c)])
            else:
                image[..., c] = nonzero_zscore(image[..., c])
        image, label, geom = to_common_space(image, label, affine, self.orientation, self.target_spacing)
        item = {"image": image.astype(np.float32), "label": label, "geom": geom, "case": case}
        if label is not None:
            rng = np.random.default_rng(0)
            fg = {}
            for k in range(1, len(self.task.class_names)):
                vox = np.argwhere(label == k)
                if len(vox) > _MAX_FG_VOXELS:
                    vox = vox[rng.choice(len(vox), _MAX_FG_VOXELS, replace=False)]
                fg[k] = vox
            item["fg"] = fg
        if self.cache_volumes:
            self._cache[key] = item
        return item


class PatchDataset(WorkerSeeded, Dataset):
    """Random training patches; a fixed ``oversample_foreground`` share of the indices is centred
    on a foreground voxel (of a random present class), then flips and intensity augmentation.

    Returns (per item): dict(image=(C, *patch) float32, label=(*patch) int64, name=str).
    """

    def __init__(self, loader: CaseLoader, cases: list[Case], patch_size: Sequence[int], samples_per_volume: int,
                 oversample_foreground: float, augment: bool) -> None:
        self.loader, self.cases, self.patch_size = loader, cases, tuple(int(p) for p in patch_size)
        self.samples_per_volume, self.augment = samples_per_volume, augment
        n = len(cases) * samples_per_volume
        self.force_fg = np.zeros(n, dtype=bool)
        self.force_fg[np.random.default_rng(0).permutation(n)[: int(round(n * oversample_foreground))]] = True

    def __len__(self) -> int:
        return len(self.force_fg)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        item = self.loader.load(self.cases[index % len(self.cases)])
        fg = item["fg"] if self.force_fg[index] else None
        image, label = sample_patch(item["image"], item["label"], self.patch_size, rng, fg)
        if self.augment:
            image, label = random_flip(image, label, rng)
            image = intensity_augment(image, rng)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.int64)),
                "name": item["case"].name}


class VolumeDataset(Dataset):
    """Whole preprocessed volumes with what is needed to save predictions in the original space.

    Returns (per item): dict(image=(C, D, H, W) float32, label=(D, H, W) int64 (absent for
    unlabelled cases), affine (4, 4) float64, ornt (3, 2), spacing (3,) mm of (D, H, W),
    original_shape (3,), common_shape (3,), path=str, name=str).
    """

    def __init__(self, loader: CaseLoader, cases: list[Case]) -> None:
        self.loader, self.cases = loader, cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.loader.load(self.cases[index])
        geom: CaseGeometry = item["geom"]
        out: dict[str, Any] = {"image": torch.from_numpy(item["image"])}
        if item["label"] is not None:
            out["label"] = torch.from_numpy(item["label"])
        out.update({k: torch.as_tensor(np.asarray(v)) for k, v in geom.items()})
        out["path"], out["name"] = str(item["case"].images[0]), item["case"].name
        return out


GEOMETRY_KEYS = ("affine", "ornt", "spacing", "original_shape", "common_shape")


def collate_volumes(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that the geometry (``GEOMETRY_KEYS``) stays float64 / int64
    numpy arrays stacked over the batch. NOTE: Lightning's ``precision="16-true"`` /
    ``"bf16-true"`` cast every floating tensor of a batch: an fp16 affine lost its translation's
    decimals (201.37 mm -> 201.375) and a bf16 one could not be written at all."""
    from torch.utils.data import default_collate

    out = default_collate([{k: v for k, v in b.items() if k not in GEOMETRY_KEYS} for b in batch])
    for key in GEOMETRY_KEYS:
        if all(key in b for b in batch):
            out[key] = np.stack([np.asarray(b[key].numpy() if isinstance(b[key], torch.Tensor) else b[key])
                                 for b in batch])
    return out


def save_prediction(pred: torch.Tensor | np.ndarray, meta: dict[str, Any], path: str | Path, index: int = 0) -> Path:
    """Write a (D, H, W) class map as NIfTI on the original voxel grid of the case.

    Args:
        pred: predicted classes on the grid of the batch's ``image`` (D, H, W), or (1, D, H, W).
        meta: the validation/test batch (or one item); entry ``index`` is used when batched.
        path: output ``.nii.gz`` path (never inside the dataset folder).
        index: item of the batch.

    Returns:
        The written path.
    """
    geom = {k: meta[k] for k in ("affine", "ornt", "common_shape")}
    if geom["affine"].ndim == 3:  # batched
        geom = {k: v[index] for k, v in geom.items()}
    pred_arr = pred.detach().cpu() if isinstance(pred, torch.Tensor) else torch.as_tensor(pred)
    pred_arr = pred_arr.reshape(pred_arr.shape[-3:])
    out = restore_original_space(pred_arr, geom).astype(np.uint8)
    affine = geom["affine"].detach().cpu().numpy() if isinstance(geom["affine"], torch.Tensor) else geom["affine"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out, np.asarray(affine, dtype=np.float64)), str(path))
    return path


def compute_ct_stats(task: MSDTask, cases: list[Case], seed: int = 0) -> dict[str, dict[str, float]]:
    """Foreground intensity statistics of each CT channel over ``cases`` (nnU-Net's fingerprint:
    up to 10,000 random foreground voxels per case; mean, std, 0.5 and 99.5 percentiles)."""
    ct = [c for c, m in enumerate(task.modalities) if m.upper() == "CT"]
    samples: dict[int, list[np.ndarray]] = {c: [] for c in ct}
    rng = np.random.default_rng(seed)
    for case in cases:
        image, label, _ = read_case(case.images, case.label, len(task.modalities), len(task.class_names))
        fg = label > 0
        if not fg.any():
            continue
        for c in ct:
            vals = image[..., c][fg]
            if len(vals) > _MAX_FG_VOXELS:
                vals = vals[rng.choice(len(vals), _MAX_FG_VOXELS, replace=False)]
            samples[c].append(vals)
    stats = {}
    for c in ct:
        if not samples[c]:
            raise DataError(task.json_path, "training", "no foreground voxel in any label, CT statistics undefined",
                            "check the labels (all background?)")
        v = np.concatenate(samples[c]).astype(np.float64)
        stats[str(c)] = {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(np.percentile(v, 0.5)),
                         "p99_5": float(np.percentile(v, 99.5)), "num_voxels": int(len(v))}
    return stats


class MedicalDecathlonDataModule(L.LightningDataModule):
    """A Medical Segmentation Decathlon task (or any folder with an MSD ``dataset.json``).

    The training list of ``dataset.json`` is split into train/val by ``val_fraction`` (seeded);
    ``test`` uses the same held-out labelled cases, ``predict`` the unlabelled ``test`` list.

    Args:
        root: the task folder (holding ``dataset.json``).
        patch_size: training patch (D, H, W) voxels.
        batch_size: training batch size (validation/test use 1: whole volumes).
        num_workers: DataLoader workers.
        samples_per_volume: patches per case per epoch.
        oversample_foreground: share of patches centred on foreground (nnU-Net: 1/3).
        val_fraction: share of the training list held out (a single case is used for both).
        split_seed: seed of the split.
        orientation: common orientation (axis codes of x, y, z), e.g. "RAS".
        target_spacing: resample to this (D, H, W) spacing in mm; None keeps the file's.
        augment: flips and intensity augmentation of training patches.
        cache_volumes: keep preprocessed volumes in memory (per worker).
        cache_dir: where CT statistics are cached (default ``~/.cache/mamba_dense``; never
            inside ``root``).
        on_missing: ``dataset.json`` entries naming missing files: "error" (default) raises naming
            the file, "skip" drops the case with a warning (counts: ``skipped`` after ``setup``).
        pin_memory, persistent_workers, prefetch_factor: DataLoader settings (None: pin when
            CUDA is available, persistent whenever ``num_workers > 0``, PyTorch's prefetch).

    Attributes:
        num_classes, class_names: from ``dataset.json`` labels (background included).
        modalities, in_channels: from ``dataset.json`` modality.
        normalization: per channel, "ct" or "zscore_nonzero".

    Example:
        >>> dm = MedicalDecathlonDataModule("data/Task09_Spleen", patch_size=(64, 128, 128))
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str,
        patch_size: tuple[int, int, int] = (128, 128, 128),
        batch_size: int = 2,
        num_workers: int = 4,
        samples_per_volume: int = 2,
        oversample_foreground: float = 1 / 3,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        orientation: str = "RAS",
        target_spacing: tuple[float, float, float] | None = None,
        augment: bool = True,
        cache_volumes: bool = False,
        cache_dir: str | None = None,
        on_missing: str = "error",
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        self.on_missing = check_choice("on_missing", on_missing, ("error", "skip"))
        self.loader_kwargs = {"pin_memory": pin_memory, "persistent_workers": persistent_workers,
                              "prefetch_factor": prefetch_factor}
        # NOTE: not sent to the logger: Lightning merges the datamodule's and the task's logged
        # hyperparameters and stops the run when a name holds two values (the tasks' own patch_size /
        # size_divisor are the inference window / padding and may differ); the CLI's config.yaml keeps them
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.patch_size = check_sizes("patch_size", patch_size, 3, "(128, 128, 128)")
        self.batch_size = int(check_number("batch_size", batch_size, 1, example="2"))
        self.num_workers = int(check_number("num_workers", num_workers, 0, example="4"))
        self.samples_per_volume = check_sizes("samples_per_volume", samples_per_volume, 1, "4")[0]
        self.oversample_foreground = check_number("oversample_foreground", oversample_foreground, 0, 1, example="0.33")
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.orientation, self.augment, self.cache_volumes = orientation, augment, cache_volumes
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        check_outside(self.cache_dir, self.root, "cache_dir")
        self.orientation, self.target_spacing = check_orientation(orientation), check_spacing(target_spacing)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction}: expected a share in (0, 1) of the training list. Fix: e.g. "
                             "val_fraction=0.2; to train without validation pass trainer.limit_val_batches=0")
        self._task: MSDTask | None = None
        self._loader: CaseLoader | None = None
        self._saved_ct_stats: dict[str, dict[str, float]] | None = None
        self.datasets: dict[str, Dataset] = {}

    # -- dataset.json ------------------------------------------------------------------------
    @property
    def task(self) -> MSDTask:
        if self._task is None:
            self._task = parse_dataset_json(self.root, self.on_missing)
        return self._task

    @property
    def skipped(self) -> dict[str, int]:
        """Cases dropped from ``dataset.json`` by reason (``on_missing="skip"``)."""
        return {k: len(v) for k, v in self.task.skipped.items()}

    @property
    def num_classes(self) -> int:
        return len(self.task.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.task.class_names)

    @property
    def modalities(self) -> list[str]:
        return list(self.task.modalities)

    @property
    def in_channels(self) -> int:
        return len(self.task.modalities)

    @property
    def normalization(self) -> list[str]:
        return ["ct" if m.upper() == "CT" else "zscore_nonzero" for m in self.task.modalities]

    def split(self) -> tuple[list[Case], list[Case]]:
        """(train, val) cases: a seeded split of the dataset.json training list."""
        cases = self.task.training
        if len(cases) == 1:
            warnings.warn(f"{self.task.json_path}: one training case, used for both training and validation",
                          stacklevel=2)
            return cases, cases
        order = np.random.default_rng(self.split_seed).permutation(len(cases))
        n_val = min(len(cases) - 1, max(1, int(round(len(cases) * self.val_fraction))))
        val = sorted(order[:n_val].tolist())
        return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]

    # -- CT statistics ---------------------------------------------------------------------
    def _stats_path(self) -> Path:
        h = hashlib.sha1(self.task.json_path.read_bytes())
        for case in self.task.training:
            for p in (*case.images, case.label):
                st = os.stat(p)
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.task.name)[:64]
        return self.cache_dir / "ct_stats" / f"{safe}-{h.hexdigest()[:16]}.json"

    def prepare_data(self) -> None:
        """Compute and cache CT statistics (all training cases, as nnU-Net) if any channel is CT."""
        if "ct" not in self.normalization:
            return
        path = self._stats_path()
        if path.is_file():
            return
        stats = compute_ct_stats(self.task, self.task.training)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(stats, indent=1))
        os.replace(tmp, path)

    def ct_stats(self) -> dict[str, dict[str, float]]:
        """CT clipping / normalization statistics per CT channel: those restored from a checkpoint
        (``load_state_dict``), else computed from the current training cases (cached on disk)."""
        if "ct" not in self.normalization:
            return {}
        if self._saved_ct_stats is not None:
            return self._saved_ct_stats
        path = self._stats_path()
        if not path.is_file():
            self.prepare_data()
        return json.loads(path.read_text())

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the CT statistics the model was trained with, so that evaluating
        or predicting from the checkpoint normalizes as in training even after the training
        cases changed."""
        stats = self.ct_stats()
        return {"ct_stats": stats} if stats else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stats = state_dict.get("ct_stats")
        if not stats:
            return
        saved = {str(c): {k: float(v) for k, v in st.items()} for c, st in stats.items()}
        if self._saved_ct_stats is None and "ct" in self.normalization:
            try:
                live = self.ct_stats()
            except (OSError, DataError):  # training files gone: the checkpoint's statistics are all there is
                live = saved
            if live != saved:
                msg = (f"{self.task.json_path}: the CT statistics of the current training cases differ from those "
                       f"saved with the checkpoint ({live} vs {saved}); the checkpoint's are used, as in training")
                warnings.warn(msg, stacklevel=2)
        self._saved_ct_stats = saved
        if self._loader is not None:  # Lightning restores the datamodule after setup() built the loader
            self._loader.ct_stats = saved
            self._loader._cache.clear()

    # -- datasets --------------------------------------------------------------------------
    def case_loader(self) -> CaseLoader:
        if self._loader is None:
            self._loader = CaseLoader(self.task, self.orientation, self.target_spacing, self.ct_stats(),
                                      self.cache_volumes)
        return self._loader

    def _get(self, split: str) -> Dataset:
        if split not in self.datasets:
            train, val = self.split()
            if split == "train":
                ds: Dataset = PatchDataset(self.case_loader(), train, self.patch_size, self.samples_per_volume,
                                           self.oversample_foreground, self.augment)
            elif split in ("val", "test"):
                ds = VolumeDataset(self.case_loader(), val)
            else:
                if not self.task.test:
                    raise ValueError(f"{self.task.json_path}: 'test' lists no images to predict. Fix: add them "
                                     "to dataset.json 'test' or use the test stage (held-out labelled cases)")
                ds = VolumeDataset(self.case_loader(), self.task.test)
            self.datasets[split] = ds
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        report_skipped(f"MSD task {self.task.json_path}", self.task.skipped)
        for split in wanted.get(stage or "", ["train", "val", "test"]):
            self._get(split)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self._get("train"), self.batch_size, True, self.num_workers, **self.loader_kwargs)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self._get("val"), 1, False, self.num_workers, collate_volumes, **self.loader_kwargs)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self._get("test"), 1, False, self.num_workers, collate_volumes, **self.loader_kwargs)

    def predict_dataloader(self) -> DataLoader:
        return make_loader(self._get("predict"), 1, False, self.num_workers, collate_volumes, **self.loader_kwargs)


class SyntheticVolumesDataModule(MedicalDecathlonDataModule):
    """A small synthetic CT task (ellipsoid body, organ and lesion blobs) written as an MSD
    folder by ``prepare_data`` and read by the MSD reader; volumes are cached in memory.

    Args:
        root: task folder to write/read (default ``~/.cache/mamba_dense/datasets/synthetic_volumes``).
        patch_size, batch_size, num_workers, samples_per_volume: as in ``MedicalDecathlonDataModule``.
        num_cases: labelled cases written (plus 2 unlabelled test cases).
        shape: volume shape (x, y, z).
        num_foreground: foreground classes.
        seed: writer seed.
        cache_dir: CT statistics cache.
    """

    def __init__(
        self,
        root: str | None = None,
        patch_size: tuple[int, int, int] = (32, 32, 32),
        batch_size: int = 2,
        num_workers: int = 0,
        samples_per_volume: int = 2,
        num_cases: int = 8,
        shape: tuple[int, int, int] = (48, 48, 48),
        num_foreground: int = 2,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        root = root if root is not None else str(default_cache_dir() / "datasets" / "synthetic_volumes")
        super().__init__(root, patch_size=patch_size, batch_size=batch_size, num_workers=num_workers,
                         samples_per_volume=samples_per_volume, cache_volumes=True, cache_dir=cache_dir)
        self.num_cases, self.shape, self.num_foreground, self.seed = num_cases, tuple(shape), num_foreground, seed

    def write(self) -> None:
        write_msd_like(self.root, num_cases=self.num_cases, shape=self.shape,
                       num_foreground=self.num_foreground, seed=self.seed)

    @property
    def task(self) -> MSDTask:
        if self._task is None:
            self.write()
        return super().task

    def prepare_data(self) -> None:
        self.write()
        super().prepare_data()
