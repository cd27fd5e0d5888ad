"""Globs, skips and per-layer overrides resolve to the right per-module plan, or fail clearly."""

import pytest
from torch import nn

from qsweep.config import ConfigError, quant_recipe
from qsweep.quant.plan import resolve_plan


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8, 4)


def test_defaults_cover_every_layer():
    plan = resolve_plan(Net(), quant_recipe({}))
    assert sorted(plan) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head", "stem"]
    assert plan["head"].weight.bits == 4 and plan["head"].act.bits == 8


def test_skip_globs_and_prefixes():
    plan = resolve_plan(Net(), quant_recipe({"skip": ["head", "blocks.1"]}))
    assert sorted(plan) == ["blocks.0.fc1", "blocks.0.fc2", "stem"]
    plan = resolve_plan(Net(), quant_recipe({"skip": ["*.fc2"]}))
    assert "blocks.0.fc2" not in plan and "blocks.0.fc1" in plan


def test_overrides_apply_in_order():
    recipe = quant_recipe({"layers": {"blocks.*": {"w_bits": 2}, "blocks.1.fc2": {"w_bits": 8, "a_bits": None},
                                      "stem": {"w_granularity": "per_tensor"}}})
    plan = resolve_plan(Net(), recipe)
    assert plan["blocks.0.fc1"].weight.bits == 2
    assert plan["blocks.1.fc2"].weight.bits == 8 and plan["blocks.1.fc2"].act is None
    assert plan["stem"].weight.granularity == "per_tensor" and plan["head"].weight.bits == 4


def test_unmatched_glob_names_close_modules():
    with pytest.raises(ConfigError, match=r"quant.skip pattern 'haed'.*head"):
        resolve_plan(Net(), quant_recipe({"skip": ["haed"]}))
    with pytest.raises(ConfigError, match=r"quant.layers pattern 'blocks.2.fc1'.*blocks"):
        resolve_plan(Net(), quant_recipe({"layers": {"blocks.2.fc1": {"w_bits": 8}}}))


@pytest.mark.parametrize("recipe,match", [
    ({"weight": {"bits": 1}}, r"quant.weight.bits=1 .* 2..8"),
    ({"weight": {"bits": 9}}, r"quant.weight.bits=9"),
    ({"act": {"bits": 3}}, r"quant.act.bits=3 .* 4..16"),
    ({"act": {"bits": 17}}, r"quant.act.bits=17"),
    ({"act": {"observer": "minmx"}}, r"quant.act.observer='minmx'.*did you mean 'minmax'"),
    ({"weight": {"granularity": "per_token"}}, r"quant.weight.granularity='per_token'"),
    ({"weight": {"colour": 1}}, r"colour"),
    ({"layers": {"head": {"w_bit": 4}}}, r"quant.layers.head key='w_bit'"),
    ({"layers": {"head": {"w_bits": 12}}}, r"quant.layers.head.w_bits=12"),
    ({"calib": {"num_images": 0}}, r"quant.calib.num_images=0"),
])
def test_bad_recipes_fail_early(recipe, match):
    with pytest.raises(ConfigError, match=match):
        quant_recipe(recipe)


class SeparableNet(nn.Module):
    """Stem, a depthwise conv, a grouped (not depthwise) conv, a pointwise conv, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.pw = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 4)


def test_layer_kinds_select_depthwise_first_and_last():
    recipe = quant_recipe({"layers": {"@depthwise": {"w_bits": 8}, "@first": {"w_bits": 6}, "@last": {"a_bits": None}},
                           "skip": []})
    plan = resolve_plan(SeparableNet(), recipe)
    assert {n: p.weight.bits for n, p in plan.items()} == {"stem": 6, "dw": 8, "grouped": 4, "pw": 4, "head": 4}
    assert plan["head"].act is None and plan["pw"].act.bits == 8
    assert sorted(resolve_plan(SeparableNet(), quant_recipe({"skip": ["@depthwise", "@last"]}))) == ["grouped", "pw",
                                                                                                    "stem"]
    # A kind the model lacks is no error: a CNN recipe fits a ViT.
    assert len(resolve_plan(Net(), recipe)) == 6


def test_unknown_layer_kind_is_refused():
    with pytest.raises(ConfigError, match=r"quant.layers key='@depthwsie'.*did you mean '@depthwise'"):
        quant_recipe({"layers": {"@depthwsie": {"w_bits": 8}}})


def test_layer_kinds_agree_with_the_config_schema():
    from qsweep.config import LAYER_KINDS
    from qsweep.quant.plan import KINDS

    assert tuple(KINDS) == LAYER_KINDS
