"""Every datamodule builds from plain YAML values, as LightningCLI (jsonargparse) does."""

from __future__ import annotations

import pytest

jsonargparse = pytest.importorskip("jsonargparse")

from mamba_dense.datamodules import (  # noqa: E402
    ADE20KDataModule, COCOInstanceDataModule, MedicalDecathlonDataModule, ShapesDataModule, SyntheticCOCODataModule,
    SyntheticVolumesDataModule,
)

CASES = [
    (ADE20KDataModule, "root: {tmp}/ade\ncrop_size: [256, 320]\nscale: [1024, 256]\nratio_range: [0.5, 2.0]\n"
                       "num_classes: 20\nreduce_zero_label: false\n"),
    (ShapesDataModule, "root: {tmp}/shapes\ncrop_size: 96\n"),
    (COCOInstanceDataModule, "root: {tmp}/coco\ntrain_scales: [480, 512]\nresize: true\n"),
    (SyntheticCOCODataModule, "root: {tmp}/sc\n"),
    (MedicalDecathlonDataModule, "root: {tmp}/msd\npatch_size: [64, 96, 96]\ntarget_spacing: [2.0, 1.0, 1.0]\n"
                                 "cache_dir: {tmp}/cache\n"),
    (SyntheticVolumesDataModule, "root: {tmp}/vol\ncache_dir: {tmp}/cache\nshape: [32, 32, 32]\n"),
]


@pytest.mark.parametrize(("cls", "yaml"), CASES, ids=[c[0].__name__ for c in CASES])
def test_builds_from_yaml(cls, yaml, tmp_path):
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    text = "data:\n" + "".join(f"  {line}\n" for line in yaml.format(tmp=tmp_path).splitlines())
    cfg = parser.parse_string(text)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    dm = instantiate(cfg).data
    assert isinstance(dm, cls)
    assert dm.hparams["root"] == str(tmp_path / yaml.split("/")[1].split("\n")[0])
    assert not any(tmp_path.iterdir())  # constructing never touches the disk
