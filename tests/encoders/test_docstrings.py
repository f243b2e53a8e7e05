"""The examples in the docstrings of the layers, the 2D encoders and the adapters run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mamba_dense.layers.block", "mamba_dense.layers.channel_attn", "mamba_dense.layers.downsample",
    "mamba_dense.layers.mlp", "mamba_dense.layers.norm", "mamba_dense.layers.ss2d", "mamba_dense.layers.ssm",
    "mamba_dense.layers.stem", "mamba_dense.encoders", "mamba_dense.encoders._registry",
    "mamba_dense.encoders.vmamba", "mamba_dense.encoders.localmamba", "mamba_dense.encoders.himamba",
    "mamba_dense.integrations.timm", "mamba_dense.integrations.smp",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0
