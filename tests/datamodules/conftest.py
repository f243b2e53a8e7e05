"""Fixtures for the datamodule tests: real samples (skipped when absent), synthetic datasets
written once per session, and a guard that no dataset folder is modified."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``folder`` with its size and mtime (ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real sample data not found at {REALDATA.resolve()} (../shared/realdata)")
    return REALDATA.resolve()


@pytest.fixture(scope="session")
def snap():
    """The ``snapshot`` function, for before/after comparisons of dataset folders."""
    return snapshot


def _real(realdata: Path, name: str) -> Path:
    p = realdata / name
    if not p.is_dir():
        pytest.skip(f"real sample folder {p} absent")
    return p


@pytest.fixture(scope="session")
def ade_real(realdata: Path) -> Path:
    return _real(realdata, "ade20k_sceneparsing")


@pytest.fixture(scope="session")
def coco_panoptic_real(realdata: Path) -> Path:
    return _real(realdata, "coco_panopticapi")


@pytest.fixture(scope="session")
def coco_mmpose_real(realdata: Path) -> Path:
    return _real(realdata, "coco_mmpose")


@pytest.fixture(scope="session")
def spleen_real(realdata: Path) -> Path:
    return _real(realdata, "msd_spleen_ivadomed")


@pytest.fixture(scope="session")
def brats_real(realdata: Path) -> Path:
    return _real(realdata, "brats_deepmedic")


@pytest.fixture(scope="session")
def monai_real(realdata: Path) -> Path:
    return _real(realdata, "monai_nifti")


@pytest.fixture(scope="module", autouse=True)
def realdata_untouched():
    """Fails the module if any file under ../shared/realdata changed while it ran."""
    if not REALDATA.is_dir():
        yield
        return
    before = snapshot(REALDATA)
    yield
    assert snapshot(REALDATA) == before, "a test or reader modified ../shared/realdata"


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    from mamba_dense.datamodules import write_ade20k_like

    root = tmp_path_factory.mktemp("shapes")
    write_ade20k_like(root, num_train=12, num_val=4, num_classes=4, size_range=(96, 160), seed=0)
    return root


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory) -> Path:
    from mamba_dense.datamodules import write_coco_like

    return write_coco_like(tmp_path_factory.mktemp("coco") / "coco", num_train=6, num_val=3, seed=0)


@pytest.fixture(scope="session")
def msd_root(tmp_path_factory) -> Path:
    from mamba_dense.datamodules import write_msd_like

    return write_msd_like(tmp_path_factory.mktemp("msd") / "Task00_Synth", num_cases=5, num_test=1,
                          shape=(24, 28, 20), seed=0)
