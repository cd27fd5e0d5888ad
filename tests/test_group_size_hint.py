"""The group_size error suggests a per-layer override that Hydra accepts and that fixes the run."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import qsweep
from qsweep.config import ConfigError
from qsweep.quant.modules import quant_layers

CONF = str(Path(__file__).resolve().parents[1] / "conf")
RECIPE = ["quant.weight.granularity=per_group", "quant.weight.group_size=32", "quant.act.bits=null"]


def _recipe(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*RECIPE, *overrides]).quant


@pytest.mark.parametrize("model, name", [
    (nn.Sequential(nn.Linear(48, 4)), "0"),
    (nn.Sequential(OrderedDict(blocks=nn.Sequential(nn.Linear(48, 4)))), "blocks.0"),
    (nn.Sequential(nn.Sequential(nn.Linear(48, 4))), "0.0"),  # Hydra would read the key 0.0 as a float
], ids=["plain", "dotted", "number-like"])
def test_suggested_override_works(model, name):
    calib = [torch.randn(2, 48)]
    with pytest.raises(ConfigError) as err:
        qsweep.quantize(model, _recipe(), calib)
    message = str(err.value)
    assert f"does not divide the 48 input features of {name!r}" in message and "(e.g. 24)" in message
    override = re.search(r"'(\+\+quant\.layers[^']*)'$", message).group(1)
    assert "group_size: 24" in override
    q = qsweep.quantize(model, _recipe(override), calib)
    assert quant_layers(q)[name].qweight.codes.shape[-1] == 24  # groups of 24 input features
