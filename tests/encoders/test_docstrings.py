"""The examples in the docstrings of the layers, the encoders and the adapters run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mamba_dense.layers.block", "mamba_dense.layers.channel_attn", "mamba_dense.layers.downsample",
    "mamba_dense.layers.mlp", "mamba_dense.layers.norm", "mamba_dense.layers.ss2d", "mamba_dense.layers.ssm",
    "mamba_dense.layers.stem", "mamba_dense.encoders", "mamba_dense.encoders._registry",
    "mamba_dense.encoders.vmamba", "mamba_dense.encoders.localmamba", "mamba_dense.encoders.himamba",
    "mamba_dense.integrations.timm", "mamba_dense.integrations.smp", "mamba_dense.layers.pyramid",
    "mamba_dense.encoders.vim", "mamba_dense.encoders.volumetric", "mamba_dense.encoders.artifacts",
    "mamba_dense.encoders.complexity", "mamba_dense.layers.seq_mixer",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0
