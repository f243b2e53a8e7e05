"""Hypothesis fuzzing of the datamodules' input boundary: corrupted files must end in a clear error or a
counted skip, never a hang, a crash (in the main process or a DataLoader worker) or a modified file.

A tiny valid dataset per format (ADE20K JPEG/PNG pairs, COCO instances JSON + JPEGs, an MSD task of
NIfTI volumes) is written once per module by the package's synthetic writers. Every example copies it,
corrupts ONE file in a drawn way (truncation, zero bytes, overwritten magic, random or spliced bytes,
huge dimensions declared in a header, odd NIfTI header fields and datatypes, malformed or mistyped
JSON), hashes the copy, and loads everything through the datamodule: ``setup`` and every batch of its
loaders (``num_workers`` drawn from 0 and 1, so an error raised or a crash inside a worker shows).

The oracle for one example:

- an exception must be a ``DataError`` (``CorruptFileError``), ``FileNotFoundError`` or ``ValueError``
  raised by our code: its message says "Fix" and names the corrupted file (its path, or its name next
  to the dataset folder); a bare library exception (TypeError, MemoryError, a PIL/pycocotools/nibabel
  error) or "DataLoader worker ... exited unexpectedly" fails;
- success is allowed when the corrupted file still decodes (e.g. a PNG cut after its IEND chunk), and
  then every batch must be valid (shapes, finite values, labels in range); a file that no longer
  decodes may only pass with ``on_corrupt="skip"``, and then it must be counted in ``skipped``;
- the copy's files are byte-identical afterwards (sha256), and nothing new appears in it;
- each example finishes within ``TIME_LIMIT_S`` (SIGALRM), so a hang fails instead of stalling CI.

Examples are derandomized (``derandomize=True``, no example database) so CI runs are reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import json
import re
import shutil
import signal
import struct
import tempfile
import traceback
import tracemalloc
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.utils.data._utils as loader_utils
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from mamba_dense.datamodules import (
    ADE20KDataModule, COCOInstanceDataModule, DataError, MedicalDecathlonDataModule, write_ade20k_like,
    write_coco_like, write_msd_like,
)
from mamba_dense.datamodules._volume import read_case

TIME_LIMIT_S = 30.0
# Fuzzing draws function-scoped fixtures (monkeypatch, the module's work folder) once per test; every
# example makes its own copy of the dataset, so sharing them between examples is intended.
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------ harness
class Hang(Exception):
    """An example ran past TIME_LIMIT_S."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (folders as "dir")."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(autouse=True)
def _fast_worker_join(monkeypatch):
    # NOTE: a DataLoader worker that raised is joined after one status interval (5 s by default);
    # shorten it so examples that end in an error inside a worker stay quick
    monkeypatch.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    # a header may declare any size; keep PIL's bomb check (and a decode inside its warning range)
    # small on a shared CI machine: the same code path, at 4 Mpx instead of 179 Mpx
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2**22)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_work")


def _base(factory, write: Callable[[Path], Path]):
    root = write(factory.mktemp("fuzz_base"))
    before = digest(root)
    yield root
    assert digest(root) == before, "the pristine dataset changed"


@pytest.fixture(scope="module")
def ade_base(tmp_path_factory):
    yield from _base(tmp_path_factory, lambda d: write_ade20k_like(
        d, num_train=2, num_val=2, num_classes=4, size_range=(24, 40), seed=0).parent)


@pytest.fixture(scope="module")
def coco_base(tmp_path_factory):
    yield from _base(tmp_path_factory, lambda d: write_coco_like(
        d / "coco", num_train=3, num_val=3, size_range=(24, 40), seed=0))


@pytest.fixture(scope="module")
def coco_used(coco_base) -> set[Path]:
    """Images the pristine datamodule reads (training drops its image without usable annotations)."""
    dm = COCOInstanceDataModule(str(coco_base), num_workers=0)
    dm.setup("fit")
    return {(ds.image_dir / ds.coco.imgs[i]["file_name"]).relative_to(coco_base)
            for ds in dm.datasets.values() for i in ds.ids}


@pytest.fixture(scope="module")
def msd_base(tmp_path_factory):
    yield from _base(tmp_path_factory, lambda d: write_msd_like(
        d / "Task00_Fuzz", num_cases=3, num_test=1, shape=(12, 10, 8), seed=0))


@contextlib.contextmanager
def dataset_copy(base: Path, work: Path):
    """A private copy of ``base`` (``root``) with a sibling folder for caches, removed afterwards."""
    d = Path(tempfile.mkdtemp(dir=work))
    try:
        yield shutil.copytree(base, d / "ds"), d / "cache"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def assert_clear(err: BaseException, target: Path, root: Path) -> None:
    msg = str(err)
    assert isinstance(err, (DataError, FileNotFoundError, ValueError)), f"bare {type(err).__name__}: {msg[:2000]}"
    assert "Fix" in msg, f"{type(err).__name__} without a fix (a library message?): {msg[:2000]}"
    assert str(target) in msg or (target.name in msg and str(root) in msg), \
        f"the message does not name {target}: {msg[:2000]}"


def run_example(root: Path, target: Path, load: Callable[[], Any], workers: int) -> tuple[Any, BaseException | None]:
    """Hash the copy, ``load()`` under the time limit, check the copy is unchanged; (result, error)."""
    before = digest(root)
    result, err = None, None
    with time_limit(TIME_LIMIT_S), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = load()
        except Hang:
            raise
        except Exception as e:  # judged by the caller
            err = e
            # drop the failed loader iterator now (its frames hold it): that joins its workers
            traceback.clear_frames(e.__traceback__)
    assert digest(root) == before, f"loading modified the dataset (corrupted file {target.name})"
    event(f"num_workers={workers}: {'loaded' if err is None else type(err).__name__}")  # --hypothesis-show-statistics
    if err is not None:
        assert_clear(err, target, root)
    return result, err


# ------------------------------------------------------------------------------------ corruptions
BYTE_KINDS = ["truncate", "empty", "zero_fill", "magic", "random", "splice"]


def corrupt_bytes(data: st.DataObject, raw: bytes) -> bytes:
    kind = data.draw(st.sampled_from(BYTE_KINDS), label="byte corruption")
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1), label="keep bytes")]
    if kind == "empty":
        return b""
    if kind == "zero_fill":
        return bytes(len(raw))
    if kind == "magic":
        n = data.draw(st.integers(1, 8), label="magic bytes")
        return data.draw(st.binary(min_size=n, max_size=n)) + raw[n:]
    if kind == "random":
        return data.draw(st.binary(max_size=600), label="random file")
    off = data.draw(st.integers(0, len(raw) - 1), label="splice at")
    junk = data.draw(st.binary(min_size=1, max_size=32), label="spliced bytes")
    return raw[:off] + junk + raw[off + len(junk):]


def png_with_size(raw: bytes, w: int, h: int, fix_crc: bool) -> bytes:
    b = bytearray(raw)
    struct.pack_into(">II", b, 16, w, h)  # IHDR data starts at 16
    if fix_crc:
        struct.pack_into(">I", b, 29, zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def jpeg_with_size(raw: bytes, w: int, h: int) -> bytes:
    b, i = bytearray(raw), 2
    while i + 9 <= len(b) and b[i] == 0xFF:
        marker, length = b[i + 1], struct.unpack(">H", b[i + 2: i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width
            struct.pack_into(">HH", b, i + 5, h, w)
            return bytes(b)
        i += 2 + length
    raise AssertionError("no SOF marker in the synthetic JPEG")


def corrupt_image(data: st.DataObject, path: Path) -> None:
    raw = path.read_bytes()
    if data.draw(st.booleans(), label="header size instead of bytes"):
        side = st.one_of(st.integers(0, 64), st.integers(2**12, 2**16), st.integers(2**16, 2**31 - 1))
        w, h = data.draw(side, label="width"), data.draw(side, label="height")
        if path.suffix == ".png":
            raw = png_with_size(raw, w, h, data.draw(st.booleans(), label="fix crc"))
        else:
            raw = jpeg_with_size(raw, min(w, 65535), min(h, 65535))
    else:
        raw = corrupt_bytes(data, raw)
    path.write_bytes(raw)


def decodes(path: Path) -> bool:
    """Whether PIL alone still reads the file (then loading it may succeed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as im:
                im.load()
            return True
        except Exception:
            return False


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6,
)


def mutate_json(data: st.DataObject, doc: Any) -> Any:
    """Walk a drawn path into ``doc`` and replace / delete / duplicate / empty what is there."""
    doc = copy.deepcopy(doc)
    parent, key, node = None, None, doc
    for _ in range(data.draw(st.integers(0, 6), label="depth")):
        if isinstance(node, dict) and node:
            k: Any = data.draw(st.sampled_from(sorted(node)), label="key")
        elif isinstance(node, list) and node:
            k = data.draw(st.integers(0, len(node) - 1), label="index")
        else:
            break
        parent, key, node = node, k, node[k]
    op = data.draw(st.sampled_from(["replace", "delete", "duplicate", "empty"]), label="json edit")
    if parent is None:
        return data.draw(json_value) if op == "replace" else type(doc)()
    if op == "replace":
        parent[key] = data.draw(json_value, label="new value")
    elif op == "delete":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(node))
    else:
        parent[key] = type(node)() if isinstance(node, (dict, list, str, int, float)) else 0
    return doc


# field paths the readers use ("*" = any index): a drawn one gets a drawn value or is deleted
COCO_FIELDS = [
    "images", "images.*", "images.*.id", "images.*.file_name", "images.*.height", "images.*.width",
    "annotations", "annotations.*", "annotations.*.id", "annotations.*.image_id", "annotations.*.category_id",
    "annotations.*.bbox", "annotations.*.bbox.*", "annotations.*.area", "annotations.*.iscrowd",
    "annotations.*.segmentation", "annotations.*.segmentation.*", "annotations.*.segmentation.*.*",
    "annotations.*.segmentation.counts", "annotations.*.segmentation.counts.*", "annotations.*.segmentation.size",
    "categories", "categories.*", "categories.*.id", "categories.*.name",
]
MSD_FIELDS = [
    "name", "modality", "modality.0", "labels", "labels.0", "labels.1", "labels.2", "training", "training.*",
    "training.*.image", "training.*.label", "test", "test.*", "numTraining",
]
extreme = st.sampled_from([1e9, -1e9, 1e300, -1.0, 0.5, 2**40, -(2**63), 10**30, float("nan"), float("inf"), "",
                           "../dataset.json", "x" * 5000, [], {}, [[]], [1, 2], {"counts": 5, "size": [1, 1]}])


def mutate_field(data: st.DataObject, doc: Any, fields: list[str]) -> Any:
    """Replace or delete one field the reader uses (a drawn entry of ``fields``), if the file has it."""
    doc = copy.deepcopy(doc)
    parent, key, node = None, None, doc
    for part in data.draw(st.sampled_from(fields), label="field").split("."):
        if isinstance(node, list) and node and (part == "*" or part.isdigit()):
            k: Any = data.draw(st.integers(0, len(node) - 1), label="index") if part == "*" else int(part)
            k = min(k, len(node) - 1)
        elif isinstance(node, dict) and part in node:
            k = part
        else:
            break
        parent, key, node = node, k, node[k]
    if parent is None:
        return doc
    if data.draw(st.booleans(), label="delete"):
        del parent[key]
    else:
        parent[key] = data.draw(st.one_of(extreme, json_value), label="new value")
    return doc


def corrupt_json_text(data: st.DataObject, text: str) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "bytes", "literal", "nesting", "not utf-8", "bom"]),
                     label="json text corruption")
    if kind == "truncate":
        return text[: data.draw(st.integers(0, len(text) - 1), label="keep chars")].encode()
    if kind == "bytes":
        return corrupt_bytes(data, text.encode())
    if kind == "literal":  # a number becomes NaN / Infinity / an overflow / a 5000-digit integer
        numbers = list(re.finditer(r"(?<=[:\[,\s])-?\d+(\.\d+)?([eE][+-]?\d+)?", text))
        m = numbers[data.draw(st.integers(0, len(numbers) - 1), label="number")]
        lit = data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 5000]))
        return (text[: m.start()] + lit + text[m.end():]).encode()
    if kind == "nesting":
        depth = data.draw(st.sampled_from([10, 1000, 100_000]), label="nesting depth")
        return ('{"images": ' + "[" * depth + "]" * depth + "," + text.lstrip()[1:]).encode()
    if kind == "not utf-8":
        off = data.draw(st.integers(0, len(text)), label="at")
        return text[:off].encode() + b"\xff\xfe\x80" + text[off:].encode()
    return b"\xef\xbb\xbf" + text.encode()


# ------------------------------------------------------------------------------------------ ADE20K
def _load_ade(root: Path, workers: int, on_corrupt: str, check_files: bool) -> ADE20KDataModule:
    dm = ADE20KDataModule(str(root), num_classes=4, crop_size=16, scale=(64, 16), batch_size=1, val_batch_size=1,
                          num_workers=workers, on_corrupt=on_corrupt, check_files=check_files,
                          persistent_workers=False)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for batch in loader:
            img, mask = batch["image"], batch["mask"]
            assert img.shape[0] == 1 and img.shape[1] == 3 and img.shape[2:] == mask.shape[1:]
            assert torch.isfinite(img).all()
            assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
    return dm


@settings(max_examples=50, **FUZZ)
@given(data=st.data())
def test_ade20k_corrupt_image_or_label(ade_base, work, data):
    files = sorted(p for p in ade_base.rglob("*") if p.suffix in (".jpg", ".png") and not p.name.startswith("."))
    rel = data.draw(st.sampled_from([p.relative_to(ade_base) for p in files]), label="file")
    workers = data.draw(st.sampled_from([0, 1]), label="num_workers")
    on_corrupt = data.draw(st.sampled_from(["error", "skip"]), label="on_corrupt")
    # NOTE: skips made inside a worker are counted in that worker; check_files counts them at setup
    check_files = data.draw(st.booleans(), label="check_files") or (on_corrupt == "skip" and workers > 0)
    with dataset_copy(ade_base, work) as (root, _):
        target = root / rel
        corrupt_image(data, target)
        readable = decodes(target)
        dm, err = run_example(root, target, lambda: _load_ade(root, workers, on_corrupt, check_files), workers)
        if err is None and not readable:
            assert on_corrupt == "skip", f"{rel} no longer decodes but loading succeeded with on_corrupt='error'"
            assert sum(s["corrupt"] for s in dm.skipped.values()) == 1, dm.skipped


# -------------------------------------------------------------------------------------------- COCO
def _load_coco(root: Path, workers: int, on_corrupt: str = "error", check_files: bool = False):
    dm = COCOInstanceDataModule(str(root), batch_size=1, val_batch_size=1, num_workers=workers,
                                on_corrupt=on_corrupt, check_files=check_files, persistent_workers=False)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for images, targets in loader:
            for img, t in zip(images, targets):
                n = len(t["labels"])
                assert torch.isfinite(img).all() and 0 <= img.min() and img.max() <= 1
                assert t["boxes"].shape == (n, 4) and torch.isfinite(t["boxes"]).all()
                assert (t["boxes"][:, 2:] >= t["boxes"][:, :2]).all()
                assert t["masks"].shape == (n, *img.shape[1:]) and t["iscrowd"].shape == (n,)
                assert ((t["labels"] >= 1) & (t["labels"] <= dm.num_classes)).all()
    return dm


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_coco_corrupt_image(coco_base, coco_used, work, data):
    files = sorted(p for p in coco_base.rglob("*.jpg"))
    rel = data.draw(st.sampled_from([p.relative_to(coco_base) for p in files]), label="file")
    workers = data.draw(st.sampled_from([0, 1]), label="num_workers")
    on_corrupt = data.draw(st.sampled_from(["error", "skip"]), label="on_corrupt")
    check_files = data.draw(st.booleans(), label="check_files") or (on_corrupt == "skip" and workers > 0)
    with dataset_copy(coco_base, work) as (root, _):
        target = root / rel
        corrupt_image(data, target)
        readable = decodes(target)
        dm, err = run_example(root, target, lambda: _load_coco(root, workers, on_corrupt, check_files), workers)
        if err is None and not readable and rel in coco_used:  # an unused image is never read
            assert on_corrupt == "skip", f"{rel} no longer decodes but loading succeeded with on_corrupt='error'"
            assert sum(s["corrupt"] for s in dm.skipped.values()) == 1, dm.skipped


@settings(max_examples=90, **FUZZ)
@given(data=st.data())
def test_coco_malformed_annotation_json(coco_base, work, data):
    split = data.draw(st.sampled_from(["train2017", "val2017"]), label="split")
    workers = data.draw(st.sampled_from([0, 0, 1]), label="num_workers")
    with dataset_copy(coco_base, work) as (root, _):
        target = root / "annotations" / f"instances_{split}.json"
        text = target.read_text()
        how = data.draw(st.sampled_from(["field", "field", "walk", "text"]), label="corruption")
        if how == "text":
            target.write_bytes(corrupt_json_text(data, text))
        else:
            edit = mutate_field(data, json.loads(text), COCO_FIELDS) if how == "field" else \
                mutate_json(data, json.loads(text))
            target.write_text(json.dumps(edit))
        run_example(root, target, lambda: _load_coco(root, workers), workers)


# --------------------------------------------------------------------------------------------- MSD
def _load_msd(root: Path, cache: Path, workers: int) -> MedicalDecathlonDataModule:
    dm = MedicalDecathlonDataModule(str(root), cache_dir=str(cache), patch_size=(8, 8, 8), batch_size=1,
                                    num_workers=workers, samples_per_volume=1, persistent_workers=False)
    dm.prepare_data()
    dm.setup("fit")
    loaders = [dm.train_dataloader(), dm.val_dataloader()]
    if dm.task.test:
        dm.setup("predict")
        loaders.append(dm.predict_dataloader())
    for loader in loaders:
        for batch in loader:
            assert batch["image"].dtype == torch.float32 and torch.isfinite(batch["image"]).all()
            assert batch["image"].shape[1] == dm.in_channels
            if "label" in batch:
                lab = batch["label"]
                assert lab.shape == batch["image"].shape[:1] + batch["image"].shape[2:]
                assert lab.dtype == torch.int64 and 0 <= lab.min() and lab.max() < dm.num_classes
    return dm


def _nifti_files(base: Path) -> list[Path]:
    return sorted(p.relative_to(base) for p in base.rglob("*.nii.gz") if not p.name.startswith("."))


# (offset, struct format, values) of NIfTI-1 header fields, in the uncompressed stream
_I16 = st.one_of(st.integers(-32768, 32767), st.sampled_from([-1, 0, 1, 2, 3, 4, 7, 8, 32767]))
_F32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -1.0, 1e-30, 1e30, 3e38]))
NIFTI1_FIELDS = {
    "sizeof_hdr": (0, "<i", st.integers(-2**31, 2**31 - 1)),
    "dim": (40, "<8h", st.tuples(st.integers(-1, 8), *[st.one_of(st.integers(0, 64), _I16)] * 7)),
    "datatype": (70, "<h", st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536,
                                                      1792, 2048, 2304]), _I16)),
    "bitpix": (72, "<h", _I16),
    "pixdim": (76, "<8f", st.tuples(*[_F32] * 8)),
    "vox_offset": (108, "<f", _F32),
    "scl_slope/inter": (112, "<2f", st.tuples(_F32, _F32)),
    "qform/sform_code": (252, "<2h", st.tuples(_I16, _I16)),
    "quatern/qoffset": (256, "<6f", st.tuples(*[_F32] * 6)),
    "srow_x/y/z": (280, "<12f", st.tuples(*[_F32] * 12)),
    "magic": (344, "<4s", st.binary(min_size=4, max_size=4)),
}


@settings(max_examples=70, **FUZZ)
@given(data=st.data())
def test_msd_corrupt_nifti(msd_base, work, data):
    rel = data.draw(st.sampled_from(_nifti_files(msd_base)), label="file")
    workers = data.draw(st.sampled_from([0, 1]), label="num_workers")
    with dataset_copy(msd_base, work) as (root, cache):
        target = root / rel
        if data.draw(st.booleans(), label="header field instead of bytes"):
            raw = bytearray(gzip.decompress(target.read_bytes()))
            field = data.draw(st.sampled_from(sorted(NIFTI1_FIELDS)), label="field")
            offset, fmt, values = NIFTI1_FIELDS[field]
            value = data.draw(values, label=field)
            struct.pack_into(fmt, raw, offset, *(value if isinstance(value, tuple) else (value,)))
            target.write_bytes(gzip.compress(bytes(raw)))
        else:
            target.write_bytes(corrupt_bytes(data, target.read_bytes()))
        run_example(root, target, lambda: _load_msd(root, cache, workers), workers)


# voxel types a NIfTI file can declare; complex and RGB(A) must be refused, the rest load or raise clearly
_RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
_RGBA = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
DTYPES = ["complex64", "complex128", "rgb24", "rgba32", "int64", "uint64", "int8", "uint16", "int32", "float64",
          "float32"]
REFUSED = {"complex64", "complex128", "rgb24", "rgba32"}


def _as_dtype(arr: np.ndarray, name: str) -> np.ndarray:
    if name in ("rgb24", "rgba32"):
        out = np.zeros(arr.shape, _RGB if name == "rgb24" else _RGBA)
        for f in out.dtype.names:
            out[f] = np.clip(arr, 0, 255).astype(np.uint8)
        return out
    return arr.astype(name)


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_msd_wrong_dtype_nifti(msd_base, work, data):
    rel = data.draw(st.sampled_from(_nifti_files(msd_base)), label="file")
    name = data.draw(st.sampled_from(DTYPES), label="dtype")
    special = data.draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 1e300, 2**62]), label="one voxel set to")
    workers = data.draw(st.sampled_from([0, 1]), label="num_workers")
    with dataset_copy(msd_base, work) as (root, cache):
        target = root / rel
        img = nib.load(target)
        arr = np.asarray(img.dataobj).astype(np.float64)
        if special is not None:
            arr.flat[data.draw(st.integers(0, arr.size - 1), label="voxel")] = special
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _as_dtype(arr, name)
        nib.save(nib.Nifti1Image(out, img.affine, dtype=out.dtype), target)
        _, err = run_example(root, target, lambda: _load_msd(root, cache, workers), workers)
        if name in REFUSED:
            assert isinstance(err, DataError) and "datatype" in str(err), f"{name} voxels were accepted: {err!r}"


@settings(max_examples=12, **FUZZ)
@given(data=st.data())
def test_msd_huge_declared_dims_refused_before_allocating(msd_base, work, data):
    rel = data.draw(st.sampled_from(_nifti_files(msd_base)), label="file")
    nifti2 = data.draw(st.booleans(), label="NIfTI-2 (int64 dims)")
    workers = data.draw(st.sampled_from([0, 1]), label="num_workers")
    with dataset_copy(msd_base, work) as (root, cache):
        target = root / rel
        img = nib.load(target)
        arr = np.asarray(img.dataobj)
        cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        raw = bytearray(cls(arr, img.affine).to_bytes())  # uncompressed single-file bytes
        if nifti2:  # dim: 8 x int64 at 16; up to 2^30 per axis, as the header allows
            dims = data.draw(st.tuples(*[st.integers(2**10, 2**30)] * 3), label="dims")
            struct.pack_into("<8q", raw, 16, 3, *dims, 1, 1, 1, 1)
        else:  # dim: 8 x int16 at 40; 1024^3 and more (the file holds 960 voxels)
            dims = data.draw(st.tuples(*[st.integers(2**10, 32767)] * 3), label="dims")
            struct.pack_into("<8h", raw, 40, 3, *dims, 1, 1, 1, 1)
        target.write_bytes(gzip.compress(bytes(raw)))
        # a label's case image has the same name in imagesTr (synthetic layout)
        image, label = (root / "imagesTr" / target.name, target) if "labelsTr" in rel.parts else (target, None)
        # read directly under tracemalloc: the refusal must come from the header, before the array exists
        tracemalloc.start()
        try:
            with pytest.raises(DataError, match=r"dim \(header\): declares .* voxels") as info:
                read_case([image], label, 1, 3)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(target) in str(info.value)
        assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the refusal"
        # and through the datamodule, in a worker or not
        _, err = run_example(root, target, lambda: _load_msd(root, cache, workers), workers)
        assert err is not None


@settings(max_examples=80, **FUZZ)
@given(data=st.data())
def test_msd_malformed_dataset_json(msd_base, work, data):
    workers = data.draw(st.sampled_from([0, 0, 1]), label="num_workers")
    with dataset_copy(msd_base, work) as (root, cache):
        target = root / "dataset.json"
        text = target.read_text()
        how = data.draw(st.sampled_from(["field", "field", "walk", "text"]), label="corruption")
        if how == "text":
            target.write_bytes(corrupt_json_text(data, text))
        else:
            edit = mutate_field(data, json.loads(text), MSD_FIELDS) if how == "field" else \
                mutate_json(data, json.loads(text))
            target.write_text(json.dumps(edit))
        run_example(root, target, lambda: _load_msd(root, cache, workers), workers)
